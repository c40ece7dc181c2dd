"""Uniform sampling: a seeded simple random sample of cells, without replacement."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from grnx_core import CellSample, Sampler
from grnx_plugins.samplers._sample_size import SampleSizeParams, sample_size

if TYPE_CHECKING:
    import anndata


class UniformSampler(Sampler):
    """Every subset of the requested size is equally likely; every chosen cell has weight 1.

    The baseline WDS is compared with (Wu et al., NeurIPS 2024, section 4). Reads only
    ``adata.n_obs``, so it never touches the expression of backed data.
    """

    name = "uniform"
    description = "Simple random sample of cells without replacement (fraction or n_cells), weights 1."
    reference = "https://arxiv.org/abs/2410.15616"

    class Params(SampleSizeParams):
        pass

    def sample(self, adata: anndata.AnnData, rng: np.random.Generator) -> CellSample:
        n_obs = adata.n_obs
        n_draw = sample_size(n_obs, self.fraction, self.n_cells, "sampler 'uniform'")
        indices = np.sort(rng.choice(n_obs, size=n_draw, replace=False))
        return CellSample(
            indices=indices,
            weights=np.ones(n_draw),
            n_cells_total=n_obs,
            info={"sampler": self.name, "n_cells_sampled": int(n_draw), "fraction_sampled": n_draw / n_obs},
        )
