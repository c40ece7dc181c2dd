"""Natural (or base-b) log of one plus the expression (scanpy ``pp.log1p``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from grnx_core import ComponentParams, Preprocessor
from grnx_plugins.preprocess._common import keep_counts, require_in_memory

if TYPE_CHECKING:
    import anndata


class Log1p(Preprocessor):
    """``X = log(1 + X)``; records the base in ``uns["log1p"]`` as scanpy does.

    Keeps the raw counts in ``layers["counts"]`` (copied from ``X`` first if the layer is absent).
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
        keep_counts(adata)
        sc.pp.log1p(adata, base=self.base)
        return adata
