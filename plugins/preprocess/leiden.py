"""Leiden clustering of the neighbour graph (scanpy ``tl.leiden``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

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


class Leiden(Preprocessor):
    """Writes cluster labels to ``obs[key_added]`` and the settings to ``uns[key_added]``.

    Needs the graph from ``neighbors``. ``flavor: igraph`` (the default here, as scanpy
    recommends) is much faster than ``leidenalg``; both give a valid partition but not the same one.
    Seeded: the seed orders the node moves, the same seed giving the same clusters; on graphs
    without clear communities another seed gives another partition; in a recipe it derives from
    the recipe seed unless set, in Python None acts as 0.
    """

    name = "leiden"
    description = "Leiden community detection on the kNN graph (scanpy tl.leiden)."
    reference = "https://doi.org/10.1038/s41598-019-41695-z"
    writes = ("obs/<key_added>", "uns/<key_added>")

    class Params(ComponentParams):
        resolution: float = Field(1.0, gt=0, description="higher values give more clusters")
        key_added: str = Field("leiden", description="obs column for the cluster labels")
        flavor: Literal["igraph", "leidenalg"] = Field("igraph", description="implementation")
        n_iterations: int = Field(2, description="iterations of the algorithm; -1 runs until stable")
        seed: int | None = seed_field("random state of the node order (and the figure's cell subset)")
        color_by: list[str] = Field(
            default_factory=list, description="more obs columns to colour the figure's UMAP by (batch, label)"
        )
        figure_max_cells: int = Field(20_000, ge=10, description="cells drawn in the figure (random subset)")

    def __call__(self, adata: anndata.AnnData) -> anndata.AnnData:
        import scanpy as sc

        require_in_memory(adata, self.name)
        require_neighbour_graph(adata, self.name)
        extra = {"directed": False} if self.flavor == "igraph" else {}
        sc.tl.leiden(
            adata,
            resolution=self.resolution,
            key_added=self.key_added,
            flavor=self.flavor,
            n_iterations=self.n_iterations,
            random_state=seed_or_zero(self.seed),
            **extra,
        )
        return adata

    def figures(self, adata: anndata.AnnData) -> dict[str, matplotlib.figure.Figure]:
        return umap_figures(
            adata,
            [self.key_added, *self.color_by],
            "leiden_umap",
            f"Leiden clusters ({adata.obs[self.key_added].nunique()})",
            self.figure_max_cells,
            seed_or_zero(self.seed),
        )
