"""Geometric sketching: cells drawn evenly over a plaid covering of PCA space (the geosketch package).

Hie, Cho, DeMeo, Bryson & Berger, "Geometric sketching compactly summarizes the single-cell
transcriptomic landscape", Cell Systems 2019 (https://doi.org/10.1016/j.cels.2019.05.003).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from grnx_core import CellSample, Sampler
from grnx_plugins.samplers._embedding import EmbeddingDraw, EmbeddingSampleParams

if TYPE_CHECKING:
    import anndata


class GeometricSketchSampler(Sampler):
    """``geosketch.gs`` on the PCA coordinates (see ``_embedding``): covers PCA space with boxes of
    equal side, then draws boxes uniformly and one cell per box, so sparse regions (rare states)
    are drawn about as often as dense ones. Weights 1.

    Seeded: ``gs`` gets ``seed`` = the first draw of the sampler's generator in ``[0, 2^31 - 1)``;
    it reseeds numpy's global random state, which is restored after the call. Time about linear in
    the cells per binary-search step of the box side (pure Python loops: tens of seconds at 100k).
    """

    name = "geosketch"
    description = "Geometric sketching (Hie et al. 2019): one cell per box of a plaid covering of PCA space."
    reference = "https://doi.org/10.1016/j.cels.2019.05.003"

    class Params(EmbeddingSampleParams):
        n_boxes: int | None = Field(
            None,
            ge=1,
            description="covering boxes k; as many as cells to draw when None (the package's 'auto')",
        )
        alpha: float = Field(
            0.1, gt=0, lt=1, description="box-count tolerance of the binary search: k (1 +- alpha) boxes"
        )
        max_iter: int = Field(200, ge=1, description="binary-search steps at most")

    def sample(self, adata: anndata.AnnData, rng: np.random.Generator) -> CellSample:
        import geosketch

        from grnx_plugins.samplers._legacy_random import global_random_state_restored

        draw = EmbeddingDraw.prepare(self, adata, rng)
        with global_random_state_restored():
            chosen = geosketch.gs(
                draw.coordinates,
                draw.n_draw,
                k=self.n_boxes if self.n_boxes is not None else "auto",
                seed=draw.seed,
                replace=False,
                alpha=self.alpha,
                max_iter=self.max_iter,
            )
        return draw.sample(self.name, chosen)
