"""Principal components of ``X`` (scanpy ``pp.pca``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from grnx_core import ComponentParams, Preprocessor
from grnx_core.components import seed_field
from grnx_core.errors import DataError
from grnx_plugins.preprocess._common import require_in_memory, seed_or_zero

if TYPE_CHECKING:
    import anndata


class Pca(Preprocessor):
    """Writes ``obsm["X_pca"]``, ``varm["PCs"]`` and ``uns["pca"]`` (variance, variance ratio).

    By default only the highly variable genes enter (when ``var["highly_variable"]`` exists), as
    in scanpy. ``n_comps`` is lowered to fit small data (below min(cells, genes)). Seeded: the seed
    is the solver's random state, the same seed giving the same components; it changes them
    markedly only with the randomized solver on dense data (arpack's start vector only moves the
    last digits); in a recipe it derives from the recipe seed unless set, in Python None acts as 0.
    """

    name = "pca"
    description = "Principal component analysis of X (scanpy pp.pca)."
    reference = "https://doi.org/10.1186/s13059-017-1382-0"
    writes = ("obsm/X_pca", "varm/PCs", "uns/pca")

    class Params(ComponentParams):
        n_comps: int = Field(50, ge=1, description="number of components")
        use_highly_variable: bool | None = Field(
            None, description="use only var['highly_variable'] genes; when None, only if that column exists"
        )
        svd_solver: Literal["arpack", "randomized", "auto", "covariance_eigh"] | None = Field(
            None, description="solver passed to scanpy; its default when None"
        )
        seed: int | None = seed_field("random state of the solver")

    def __call__(self, adata: anndata.AnnData) -> anndata.AnnData:
        import scanpy as sc

        require_in_memory(adata, self.name)
        has_hvg = "highly_variable" in adata.var.columns
        if self.use_highly_variable and not has_hvg:
            raise DataError(
                "preprocessor 'pca': use_highly_variable is true but var has no 'highly_variable' column. "
                "Add highly_variable_genes before pca, or set use_highly_variable: null."
            )
        use_hvg = has_hvg if self.use_highly_variable is None else self.use_highly_variable
        n_genes = int(adata.var["highly_variable"].sum()) if use_hvg else adata.n_vars
        n_comps = min(self.n_comps, adata.n_obs - 1, n_genes - 1)
        if n_comps < 1:
            raise DataError(
                f"preprocessor 'pca': {adata.n_obs} cells x {n_genes} genes are too few for a PCA."
            )
        sc.pp.pca(
            adata,
            n_comps=n_comps,
            mask_var="highly_variable" if use_hvg else None,
            svd_solver=self.svd_solver,
            random_state=seed_or_zero(self.seed),
        )
        return adata
