"""Highly variable genes, flagged or kept (scanpy ``pp.highly_variable_genes``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from grnx_core import ComponentParams, GrnxError, Preprocessor
from grnx_plugins.preprocess._common import counts_matrix, require_in_memory, require_obs

if TYPE_CHECKING:
    import anndata


class HighlyVariableGenes(Preprocessor):
    """Flags genes in ``var["highly_variable"]`` (plus means, dispersions or variances) or keeps only them.

    ``seurat`` and ``cell_ranger`` expect log-normalised ``X``; ``seurat_v3`` reads the raw counts in
    ``layers["counts"]`` (checked). With ``subset: true`` the other genes are removed from ``X`` and
    every layer, ``layers["counts"]`` included; the counts of all genes then stay in ``adata.raw``
    (``raw.X``), since rank-based tokenizers (Geneformer) need every expressed gene, not only the
    highly variable ones.
    """

    name = "highly_variable_genes"
    description = "Flag or keep the highly variable genes (scanpy pp.highly_variable_genes)."
    reference = "https://doi.org/10.1016/j.cell.2019.05.031"
    writes = (
        "var/highly_variable",
        "var/means",
        "var/dispersions",
        "var/dispersions_norm",
        "var/variances",
        "var/variances_norm",
        "var/highly_variable_rank",
        "var/highly_variable_nbatches",
        "var/highly_variable_intersection",
        "uns/hvg",
        "X",
        "layers/counts",
        "raw",
    )

    class Params(ComponentParams):
        n_top_genes: int | None = Field(
            2000, ge=1, description="number of genes to flag; cut-offs on mean and dispersion when None"
        )
        flavor: Literal["seurat", "cell_ranger", "seurat_v3", "seurat_v3_paper"] = Field(
            "seurat", description="method; seurat_v3* use raw counts from layers['counts']"
        )
        min_mean: float = Field(
            0.0125, description="lower mean cut-off (seurat, cell_ranger without n_top_genes)"
        )
        max_mean: float = Field(3.0, description="upper mean cut-off")
        min_disp: float = Field(0.5, description="lower normalised dispersion cut-off")
        batch_key: str | None = Field(None, description="obs column; genes are ranked within each batch")
        subset: bool = Field(False, description="keep only the highly variable genes (else just flag them)")
        raw_counts_of_all_genes: bool = Field(
            True,
            description="with subset: keep the counts of every gene in adata.raw (for Geneformer-style tokenizers)",
        )
        span: float = Field(0.3, gt=0, le=1, description="loess span for seurat_v3")

    def __call__(self, adata: anndata.AnnData) -> anndata.AnnData:
        import scanpy as sc

        require_in_memory(adata, self.name)
        if self.batch_key is not None:
            require_obs(adata, self.batch_key, self.name, "batch_key")
        layer = None
        if self.flavor.startswith("seurat_v3"):
            counts_matrix(adata, self.name)
            try:
                import skmisc.loess  # noqa: F401  (scanpy imports it only inside the call)
            except ImportError as error:
                raise GrnxError(
                    f"preprocessor 'highly_variable_genes': flavor {self.flavor!r} needs the scikit-misc "
                    f"package, which is not installed (pip install scikit-misc). Or use flavor 'seurat' "
                    f"or 'cell_ranger' on log-normalised data."
                ) from error
            layer = "counts" if "counts" in adata.layers else None
        n_top = None if self.n_top_genes is None else min(self.n_top_genes, adata.n_vars)
        keep_raw = (
            self.subset and self.raw_counts_of_all_genes and adata.raw is None and "counts" in adata.layers
        )
        full_counts = adata.layers["counts"] if keep_raw else None
        full_var = adata.var[[]].copy() if keep_raw else None
        sc.pp.highly_variable_genes(
            adata,
            n_top_genes=n_top,
            flavor=self.flavor,
            min_mean=self.min_mean,
            max_mean=self.max_mean,
            min_disp=self.min_disp,
            batch_key=self.batch_key,
            subset=self.subset,
            layer=layer,
            span=self.span,
        )
        if full_counts is not None:
            import anndata as ad

            # Set after subsetting: the raw then references the full counts matrix, with no copy.
            adata.raw = ad.AnnData(X=full_counts, var=full_var)
        return adata
