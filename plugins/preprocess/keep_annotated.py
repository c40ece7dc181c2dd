"""Keep only annotated cells (listed in an annotation table, or with a value in an obs column)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from grnx_core import ComponentParams, Preprocessor
from grnx_core.errors import DataError
from grnx_plugins.data._common import carry_annotation
from grnx_plugins.preprocess._common import obs_subset, require_obs

if TYPE_CHECKING:
    import anndata


class KeepAnnotated(Preprocessor):
    """Keeps the cells an annotation covers and carries the annotation's columns into ``obs``.

    With ``table``: cells whose id (``obs_names``) is in the table's ``cell_column`` are kept and
    its ``columns`` (all but the id when None) are written to ``obs``; with ``key`` as well, cells
    whose value in that column is missing are also removed. Without ``table``: cells with a
    non-missing ``obs[key]`` are kept (e.g. after the ``rosmap`` source joined a partial
    annotation). Counts go to ``uns["keep_annotated"]``.
    """

    name = "keep_annotated"
    description = "Keep cells listed in an annotation table (carrying its labels) or with obs[key] set."
    reference = "https://doi.org/10.1038/s41586-019-1195-2"
    writes = ("obs/<columns>", "uns/keep_annotated")

    class Params(ComponentParams):
        table: str | None = Field(None, description="annotation table (CSV/TSV), one row per annotated cell")
        cell_column: str | None = Field(
            None, description="cell id column of the table; the first column when None"
        )
        columns: list[str] | None = Field(None, description="table columns to carry into obs; all when None")
        key: str | None = Field(None, description="column that must be non-missing for a cell to stay")

    def __call__(self, adata: anndata.AnnData) -> anndata.AnnData:
        who = "preprocessor 'keep_annotated'"
        if self.table is None and self.key is None:
            raise DataError(f"{who}: set 'table' (an annotation table) or 'key' (an obs column), or both.")
        keep = np.ones(adata.n_obs, dtype=bool)
        summary: dict[str, int] = {"n_cells_in": int(adata.n_obs)}
        if self.table is not None:
            listed, n_unlisted = carry_annotation(
                adata.obs, self.table, self.cell_column, self.columns, who, "Fix cell_column or the cell ids."
            )
            keep &= listed
            summary["n_table_rows_without_cell"] = n_unlisted
        if self.key is not None:
            values = require_obs(adata, self.key, self.name, "key")
            keep &= values.notna().to_numpy()
        if not keep.any():
            raise DataError(
                f"{who}: no annotated cell is left (key {self.key!r} is missing for every listed cell)."
            )
        summary["n_cells_out"] = int(keep.sum())
        adata = obs_subset(adata, keep)
        adata.uns["keep_annotated"] = summary
        return adata
