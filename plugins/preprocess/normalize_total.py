"""Scale each cell to the same total count (scanpy ``pp.normalize_total``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from grnx_core import ComponentParams, Preprocessor
from grnx_core.errors import DataError
from grnx_plugins.data._common import find_entries, require_finite
from grnx_plugins.preprocess._common import keep_counts, require_in_memory

if TYPE_CHECKING:
    import anndata


class NormalizeTotal(Preprocessor):
    """Divides each cell by its total count and multiplies by ``target_sum``, in ``X``.

    Reads and writes ``X``; keeps the raw counts in ``layers["counts"]`` (copied from ``X`` first
    if the layer is absent). With ``key_added`` the per-cell size factors go to ``obs[key_added]``.
    Refuses NaN, infinite or negative values and a matrix without counts, whose scaled values
    would be NaN (scanpy warns and goes on).
    """

    name = "normalize_total"
    description = "Scale each cell to the same total count (scanpy pp.normalize_total)."
    reference = "https://doi.org/10.1186/s13059-017-1382-0"
    writes = ("X", "layers/counts", "obs/<key_added>")

    class Params(ComponentParams):
        target_sum: float | None = Field(
            None, gt=0, description="total per cell after scaling; the median total over cells when None"
        )
        exclude_highly_expressed: bool = Field(
            False, description="leave out genes above max_fraction of a cell's total when computing it"
        )
        max_fraction: float = Field(0.05, gt=0, le=1, description="threshold for exclude_highly_expressed")
        key_added: str | None = Field(
            None, description="obs column for the size factors; not written when None"
        )

    def __call__(self, adata: anndata.AnnData) -> anndata.AnnData:
        import scanpy as sc

        require_in_memory(adata, self.name)
        _require_counts_to_scale(adata)
        keep_counts(adata)
        sc.pp.normalize_total(
            adata,
            target_sum=self.target_sum,
            exclude_highly_expressed=self.exclude_highly_expressed,
            max_fraction=self.max_fraction,
            key_added=self.key_added,
        )
        return adata


def _require_counts_to_scale(adata: anndata.AnnData) -> None:
    """Finite, non-negative values and at least one cell with counts: what scaling by totals needs."""
    import numpy as np

    who = "preprocessor 'normalize_total'"
    require_finite(
        adata.X, who, "X", adata.obs_names, adata.var_names, fix="Fix the step or the data that made them."
    )
    n_negative, first = find_entries(adata.X, lambda values: values < 0)
    if first is not None:
        row, column, value = first
        raise DataError(
            f"{who}: X holds {n_negative:,} negative value{'s' if n_negative != 1 else ''} (the first, "
            f"{value:g}, for cell {str(adata.obs_names[row])!r} and gene {str(adata.var_names[column])!r}); "
            f"scaling cells to the same total needs non-negative expression. Run normalize_total on the "
            f"counts, before steps that centre the data (scale, regress_out)."
        )
    if not (np.asarray(adata.X.sum(axis=1)).ravel() > 0).any():
        raise DataError(
            f"{who}: all {adata.n_obs:,} cells have a total of 0 (the matrix holds no counts), so "
            f"there is nothing to scale and the median total is undefined. Check that the data source "
            f"reads the right file or layer."
        )
