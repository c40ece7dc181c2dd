"""Regress out per-cell covariates such as total counts or mitochondrial share (scanpy ``pp.regress_out``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from grnx_core import ComponentParams, Preprocessor
from grnx_plugins.preprocess._common import keep_counts, require_in_memory, require_obs

if TYPE_CHECKING:
    import anndata


class RegressOut(Preprocessor):
    """Replaces ``X`` by the residuals of a per-gene linear model on obs columns ``keys``.

    ``total_counts`` and ``pct_counts_mt`` (the usual keys) are written by ``qc_filter``. ``X``
    becomes dense. Keeps the raw counts in ``layers["counts"]``.
    """

    name = "regress_out"
    description = "Residuals of a per-gene linear regression on obs covariates (scanpy pp.regress_out)."
    reference = "https://doi.org/10.1186/s13059-017-1382-0"
    writes = ("X", "layers/counts")

    class Params(ComponentParams):
        keys: list[str] = Field(
            min_length=1, description="obs columns to regress out, e.g. [total_counts, pct_counts_mt]"
        )
        n_jobs: int | None = Field(None, ge=1, description="parallel jobs; scanpy's default when None")

    def __call__(self, adata: anndata.AnnData) -> anndata.AnnData:
        import scanpy as sc

        require_in_memory(adata, self.name)
        for key in self.keys:
            require_obs(adata, key, self.name, "keys")
        keep_counts(adata)
        sc.pp.regress_out(adata, keys=list(self.keys), n_jobs=self.n_jobs)
        return adata
