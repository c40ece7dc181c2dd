"""k-nearest-neighbour graph of the cells (scanpy ``pp.neighbors``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from grnx_core import ComponentParams, Preprocessor
from grnx_core.components import seed_field
from grnx_core.errors import DataError
from grnx_plugins.preprocess._common import knn_transformer, require_in_memory, seed_or_zero

if TYPE_CHECKING:
    import anndata


class Neighbors(Preprocessor):
    """Writes ``obsp["distances"]``, ``obsp["connectivities"]`` and ``uns["neighbors"]``.

    Uses ``obsm[use_rep]`` (``X_pca`` by default, computed by scanpy if missing). The ROSMAP
    atlas used k = 100. From 8,192 cells scanpy switches to approximate neighbours (pynndescent);
    with scipy >= 1.14 that path fails inside scanpy 1.11 (``csr_array`` has no ``getnnz``), so
    this step passes scanpy the same pynndescent settings through a transformer returning
    ``csr_matrix``. Seeded: the seed is the random state of the approximate search, the same seed
    giving the same graph; below those sizes neighbours are exact and the seed changes nothing;
    in a recipe it derives from the recipe seed unless set, in Python None acts as 0.
    """

    name = "neighbors"
    description = "k-nearest-neighbour graph with UMAP connectivities (scanpy pp.neighbors)."
    reference = "https://doi.org/10.1186/s13059-017-1382-0"
    writes = ("obsp/distances", "obsp/connectivities", "uns/neighbors", "obsm/X_pca")

    class Params(ComponentParams):
        n_neighbors: int = Field(15, ge=2, description="neighbours per cell (k)")
        n_pcs: int | None = Field(None, ge=1, description="principal components used; all in X_pca when None")
        use_rep: str | None = Field(None, description="obsm key to use; X_pca (or X for few genes) when None")
        metric: str = Field("euclidean", description="distance metric")
        seed: int | None = seed_field("random state of the approximate neighbour search")

    def __call__(self, adata: anndata.AnnData) -> anndata.AnnData:
        import scanpy as sc

        require_in_memory(adata, self.name)
        if self.use_rep is not None and self.use_rep != "X" and self.use_rep not in adata.obsm:
            raise DataError(
                f"preprocessor 'neighbors': use_rep {self.use_rep!r} is not in obsm "
                f"(obsm: {', '.join(adata.obsm) or 'none'}). Run pca first or change use_rep."
            )
        if self.n_neighbors >= adata.n_obs:
            raise DataError(
                f"preprocessor 'neighbors': n_neighbors={self.n_neighbors} needs more than that many cells; "
                f"the data has {adata.n_obs}."
            )
        seed = seed_or_zero(self.seed)
        sc.pp.neighbors(
            adata,
            n_neighbors=self.n_neighbors,
            n_pcs=self.n_pcs,
            use_rep=self.use_rep,
            metric=self.metric,
            random_state=seed,
            transformer=knn_transformer(adata.n_obs, self.n_neighbors, self.metric, seed),
        )
        return adata
