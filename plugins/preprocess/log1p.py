"""Natural (or base-b) log of one plus the expression (scanpy ``pp.log1p``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from grnx_core import ComponentParams, Preprocessor
from grnx_core.errors import DataError
from grnx_plugins.data._common import find_entries, require_finite
from grnx_plugins.preprocess._common import keep_counts, require_in_memory

if TYPE_CHECKING:
    import anndata


class Log1p(Preprocessor):
    """``X = log(1 + X)``; records the base in ``uns["log1p"]`` as scanpy does.

    Keeps the raw counts in ``layers["counts"]`` (copied from ``X`` first if the layer is absent).
    Refuses NaN or infinite values and values at or below -1, where the logarithm is undefined.
    """

    name = "log1p"
    description = "log(1 + X), natural log or another base (scanpy pp.log1p)."
    reference = "https://doi.org/10.1186/s13059-017-1382-0"
    writes = ("X", "layers/counts", "uns/log1p")

    class Params(ComponentParams):
        base: float | None = Field(None, gt=0, description="logarithm base; e when None")

    def __call__(self, adata: anndata.AnnData) -> anndata.AnnData:
        import scanpy as sc

        require_in_memory(adata, self.name)
        _require_log_domain(adata)
        keep_counts(adata)
        sc.pp.log1p(adata, base=self.base)
        return adata


def _require_log_domain(adata: anndata.AnnData) -> None:
    who = "preprocessor 'log1p'"
    require_finite(
        adata.X, who, "X", adata.obs_names, adata.var_names, fix="Fix the step or the data that made them."
    )
    n_below, first = find_entries(adata.X, lambda values: values <= -1)
    if first is not None:
        row, column, value = first
        raise DataError(
            f"{who}: X holds {n_below:,} value{'s' if n_below != 1 else ''} at or below -1 (the first, "
            f"{value:g}, for cell {str(adata.obs_names[row])!r} and gene {str(adata.var_names[column])!r}), "
            f"where log(1 + x) is -inf or NaN. log1p expects non-negative expression: run it on counts "
            f"or normalised counts, before steps that centre the data (scale, regress_out)."
        )
