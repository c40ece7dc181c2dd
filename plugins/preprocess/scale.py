"""Scale each gene to unit variance and (optionally) zero mean (scanpy ``pp.scale``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from grnx_core import ComponentParams, Preprocessor
from grnx_plugins.preprocess._common import keep_counts, require_in_memory

if TYPE_CHECKING:
    import anndata


class Scale(Preprocessor):
    """Standardises every gene in ``X`` (dense afterwards when zero-centred) and clips at ``max_value``.

    Writes ``X``, ``var["mean"]``, ``var["std"]``; keeps the raw counts in ``layers["counts"]``.
    """

    name = "scale"
    description = "Scale genes to unit variance and zero mean, clipped (scanpy pp.scale)."
    reference = "https://doi.org/10.1186/s13059-017-1382-0"
    writes = ("X", "layers/counts", "var/mean", "var/std")

    class Params(ComponentParams):
        zero_center: bool = Field(True, description="subtract each gene's mean (makes sparse X dense)")
        max_value: float | None = Field(
            10.0, gt=0, description="clip scaled values above this; no clip when None"
        )

    def __call__(self, adata: anndata.AnnData) -> anndata.AnnData:
        import scanpy as sc

        require_in_memory(adata, self.name)
        keep_counts(adata)
        sc.pp.scale(adata, zero_center=self.zero_center, max_value=self.max_value)
        return adata
