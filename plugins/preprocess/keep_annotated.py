"""Keep only annotated cells (listed in an annotation table, or with a value in an obs column)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from pydantic import Field

from grnx_core import ComponentParams, Preprocessor
from grnx_core.errors import DataError
from grnx_plugins.data._common import read_table, require_columns
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
        cell_column: str | None = Field(None, description="cell id column of the table; the first column when None")
        columns: list[str] | None = Field(None, description="table columns to carry into obs; all when None")
        key: str | None = Field(None, description="column that must be non-missing for a cell to stay")

    def __call__(self, adata: anndata.AnnData) -> anndata.AnnData:
        who = "preprocessor 'keep_annotated'"
        if self.table is None and self.key is None:
            raise DataError(f"{who}: set 'table' (an annotation table) or 'key' (an obs column), or both.")
        keep = np.ones(adata.n_obs, dtype=bool)
        summary: dict[str, int] = {"n_cells_in": int(adata.n_obs)}
        if self.table is not None:
            table = read_table(self.table, who, what="annotation table")
            cell_column = self.cell_column or table.columns[0]
            require_columns(table, [cell_column, *(self.columns or [])], who, f"annotation table {self.table!r}")
            ids = table[cell_column].astype(str)
            if ids.duplicated().any():
                raise DataError(
                    f"{who}: annotation table lists cell(s) {', '.join(ids[ids.duplicated()].unique()[:3])} "
                    f"more than once in {cell_column!r}."
                )
            table = table.set_index(ids).drop(columns=[cell_column])
            columns = self.columns or list(table.columns)
            listed = adata.obs_names.isin(table.index)
            if not listed.any():
                raise DataError(
                    f"{who}: none of the {adata.n_obs} cells is in the annotation table {self.table!r} (cells look "
                    f"like {', '.join(adata.obs_names[:3])}; the table has {', '.join(table.index[:3])}). "
                    f"Fix cell_column or the cell ids."
                )
            for column in columns:
                values = table[column].reindex(adata.obs_names)
                adata.obs[column] = pd.Categorical(values) if values.dtype == object else values.to_numpy()
            keep &= listed
            summary["n_table_rows_without_cell"] = int((~table.index.isin(adata.obs_names)).sum())
        if self.key is not None:
            values = require_obs(adata, self.key, self.name, "key")
            keep &= values.notna().to_numpy()
        if not keep.any():
            raise DataError(f"{who}: no annotated cell is left (key {self.key!r} is missing for every listed cell).")
        summary["n_cells_out"] = int(keep.sum())
        adata = obs_subset(adata, keep)
        adata.uns["keep_annotated"] = summary
        return adata
