"""Two-dimensional UMAP embedding of the neighbour graph (scanpy ``tl.umap``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from grnx_core import ComponentParams, Preprocessor
from grnx_core.components import seed_field
from grnx_plugins.preprocess._common import (
    require_in_memory,
    require_neighbour_graph,
    seed_or_zero,
    umap_figures,
)

if TYPE_CHECKING:
    import anndata
    import matplotlib.figure


class Umap(Preprocessor):
    """Writes ``obsm["X_umap"]`` and ``uns["umap"]``; needs the graph from ``neighbors``.

    Seeded: the seed drives the layout's initialisation and optimisation, the same seed giving
    the same embedding, another seed another one; in a recipe it derives from the recipe seed unless set, in Python None acts as 0.
    """

    name = "umap"
    description = "UMAP embedding of the kNN graph (scanpy tl.umap)."
    reference = "https://doi.org/10.48550/arXiv.1802.03426"
    writes = ("obsm/X_umap", "uns/umap")

    class Params(ComponentParams):
        min_dist: float = Field(0.5, ge=0, description="how tightly points pack")
        spread: float = Field(1.0, gt=0, description="scale of the embedded points")
        seed: int | None = seed_field("random state of the layout (and the figure's cell subset)")
        color_by: list[str] = Field(
            default_factory=list, description="obs columns to colour the figure by (batch, cluster, label)"
        )
        figure_max_cells: int = Field(20_000, ge=10, description="cells drawn in the figure (random subset)")

    def __call__(self, adata: anndata.AnnData) -> anndata.AnnData:
        import scanpy as sc

        require_in_memory(adata, self.name)
        require_neighbour_graph(adata, self.name)
        sc.tl.umap(adata, min_dist=self.min_dist, spread=self.spread, random_state=seed_or_zero(self.seed))
        return adata

    def figures(self, adata: anndata.AnnData) -> dict[str, matplotlib.figure.Figure]:
        keys = list(self.color_by) or [k for k in ("leiden", "batch") if k in adata.obs.columns]
        return umap_figures(adata, keys, "umap", "UMAP", self.figure_max_cells, seed_or_zero(self.seed))
