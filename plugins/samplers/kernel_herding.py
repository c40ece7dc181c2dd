"""Kernel herding sketch: cells chosen greedily to match the data's kernel mean embedding (sketchKH).

Baran, Aarabi, Van Ness et al., "Kernel herding for subsampling single-cell data" (sketchKH),
bioRxiv 2023 (https://doi.org/10.1101/2023.03.29.534834); kernel herding: Chen, Welling & Smola,
UAI 2010 (https://arxiv.org/abs/1203.3472).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from grnx_core import CellSample, Sampler
from grnx_plugins.samplers._embedding import EmbeddingDraw, EmbeddingSampleParams

if TYPE_CHECKING:
    import anndata


class KernelHerdingSampler(Sampler):
    """``sketchKH.kernel_herding_main`` over all cells, on the PCA coordinates (see ``_embedding``).

    The package maps cells to 2,000 random Fourier features of a Gaussian kernel (frequencies
    ``N(0, 1/gamma^2)`` per coordinate) and picks, one at a time, the cell that best closes the gap
    between the data's mean feature vector and that of the cells chosen so far. ``gamma`` is in
    the units of the coordinates: with PCA of log1p-normalised counts, distances between cells are
    about 10-40, so ``gamma`` of that order makes the kernel see neighbourhoods rather than single
    cells. Weights 1.

    Seeded: ``frequency_seed`` = the first draw of the sampler's generator in ``[0, 2^31 - 1)``.
    Memory: the features take ``16 kB`` per cell (float64 x 2,000: 1.6 GB at 100k cells); time
    ``~ n_draw x n_cells x 2,000``.
    """

    name = "kernel_herding"
    description = "Kernel herding (sketchKH, Baran et al. 2023): cells matching the kernel mean embedding."
    reference = "https://doi.org/10.1101/2023.03.29.534834"

    class Params(EmbeddingSampleParams):
        gamma: float = Field(
            1.0,
            gt=0,
            description="kernel scale in coordinate units (frequencies ~ N(0, 1/gamma^2)); package default 1",
        )

    def sample(self, adata: anndata.AnnData, rng: np.random.Generator) -> CellSample:
        from sketchKH import kernel_herding_main

        draw = EmbeddingDraw.prepare(self, adata, rng)
        chosen = kernel_herding_main(
            np.arange(draw.n_obs),
            X=draw.coordinates,
            gamma=self.gamma,
            frequency_seed=draw.seed,
            num_subsamples=draw.n_draw,
        )
        return draw.sample(self.name, chosen, gamma=float(self.gamma))
