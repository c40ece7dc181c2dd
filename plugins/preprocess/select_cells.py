"""Keep the cells whose obs values are in given lists (e.g. one cell type; labels High vs Not AD)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from pydantic import Field

from grnx_core import ComponentParams, Preprocessor
from grnx_core.errors import DataError
from grnx_plugins.preprocess._common import obs_subset, require_obs

if TYPE_CHECKING:
    import anndata

Value = str | int | float | bool


def matches(column: pd.Series, values: list[Value]) -> np.ndarray:
    """Cells whose value is in ``values``, comparing as given and as text (YAML 1 vs obs "1")."""
    direct = column.isin(values).to_numpy()
    as_text = column.astype(str).isin([str(v) for v in values]).to_numpy()
    return direct | as_text


class SelectCells(Preprocessor):
    """Keeps cells matching every ``where`` condition and none of the ``exclude`` conditions.

    ``where: {cell_type: [Astrocyte], label: [High, Not AD]}`` keeps astrocytes labelled High or
    Not AD. A listed value that no cell has is an error (usually a typo). Unused categories are
    dropped from categorical obs columns; counts per value before and after go to
    ``uns["select_cells"]``. Works on backed data: only the kept rows are read into memory.
    """

    name = "select_cells"
    description = "Keep cells by obs values (e.g. one cell type, or labels High vs Not AD)."
    reference = "https://doi.org/10.21105/joss.04371"
    writes = ("uns/select_cells",)

    class Params(ComponentParams):
        where: dict[str, list[Value]] = Field(
            default_factory=dict, description="obs column -> values to keep; all conditions must hold"
        )
        exclude: dict[str, list[Value]] = Field(
            default_factory=dict, description="obs column -> values whose cells are removed"
        )

    def __call__(self, adata: anndata.AnnData) -> anndata.AnnData:
        if not self.where and not self.exclude:
            raise DataError(
                "preprocessor 'select_cells': set 'where' or 'exclude' (obs column -> list of values)."
            )
        keep = np.ones(adata.n_obs, dtype=bool)
        for conditions, wanted in ((self.where, True), (self.exclude, False)):
            parameter = "where" if wanted else "exclude"
            for key, values in conditions.items():
                column = require_obs(adata, key, self.name, f"{parameter}.{key}")
                hits = matches(column, values)
                absent = [v for v in values if not matches(column, [v]).any()]
                if absent:
                    present = pd.unique(column.astype(str))
                    raise DataError(
                        f"preprocessor 'select_cells': {parameter}.{key} lists {absent}, which no cell has in "
                        f"obs[{key!r}]. Values present: {', '.join(map(str, present[:20]))}"
                        f"{', ...' if len(present) > 20 else ''}."
                    )
                keep &= hits if wanted else ~hits
        if not keep.any():
            raise DataError(
                f"preprocessor 'select_cells': no cell matches all conditions (where={dict(self.where)}, "
                f"exclude={dict(self.exclude)}) among {adata.n_obs} cells."
            )
        summary = {"n_cells_in": int(adata.n_obs), "n_cells_out": int(keep.sum())}
        adata = obs_subset(adata, keep)
        adata.uns["select_cells"] = summary
        return adata
