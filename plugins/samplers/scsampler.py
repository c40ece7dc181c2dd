"""scSampler: cells picked one by one to stay far from those already picked (the scsampler package).

Song, Wang & Li, "scSampler: fast diversity-preserving subsampling of large-scale single-cell
transcriptomic data", Bioinformatics 2022 (https://doi.org/10.1093/bioinformatics/btac271).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from grnx_core import CellSample, Sampler
from grnx_core.errors import DataError
from grnx_plugins.samplers._embedding import EmbeddingDraw, EmbeddingSampleParams

if TYPE_CHECKING:
    import anndata


class ScSampler(Sampler):
    """``scsampler.scsampler`` on the PCA coordinates (see ``_embedding``). Weights 1.

    The package's greedy rule (its ``uclab``): start from a random cell, then repeatedly add the
    cell whose summed repulsion ``sum_s 1/d(x, s)^alpha`` from the chosen cells is smallest, with
    ``alpha = 4 x the number of dimensions``; with ``random_split: m`` the cells are shuffled and
    split into ``m`` parts sampled separately (time ``~ n_draw x n_cells x d / m``).

    Seeded: the package gets ``random_state`` = the first draw of the sampler's generator in
    ``[0, 2^31 - 1)``; it reseeds numpy's global random state, which is restored after the call.

    Compatibility: scsampler 1.0.2 assigns a one-element array to an array element
    (``sample_index[0] = np.random.randint(N, size=1)``), which NumPy 2 refuses. The call runs with
    that one ``randint`` returning its single value as a scalar (the same draw from the same
    global state), inside the package's module only, so the package's algorithm is unchanged.

    Caveat of the package: ``1/d^alpha`` underflows to 0 for distances above ``~10^(308/alpha)``
    (35 at 50 components), and the package reads a repulsion of 0 as "not yet scored" and skips
    such cells while any other remains; far-away cells are therefore not preferred. A sample with
    a repeated cell (possible when every repulsion underflows) is refused; fewer ``n_pcs`` lower
    alpha.
    """

    name = "scsampler"
    description = "scSampler (Song et al. 2022): greedy farthest-point style subsampling in PCA space."
    reference = "https://doi.org/10.1093/bioinformatics/btac271"

    class Params(EmbeddingSampleParams):
        random_split: int = Field(
            1, ge=1, description="parts the shuffled cells are split into and sampled separately (speed)"
        )

    def sample(self, adata: anndata.AnnData, rng: np.random.Generator) -> CellSample:
        import scsampler

        from grnx_plugins.samplers._legacy_random import global_random_state_restored

        draw = EmbeddingDraw.prepare(self, adata, rng)
        if self.random_split > draw.n_draw:
            raise DataError(
                f"{draw.who}: random_split={self.random_split} parts for {draw.n_draw} cells to draw leaves "
                "parts with nothing to draw; lower sampler.params.random_split."
            )
        with global_random_state_restored(), _scalar_single_randint():
            chosen = scsampler.scsampler(
                draw.coordinates, n_obs=draw.n_draw, random_state=draw.seed, random_split=self.random_split
            )
        chosen = np.asarray(chosen, dtype=np.int64)
        indices = np.unique(chosen)
        dimensions = draw.coordinates.shape[1]
        if indices.size != chosen.size:
            raise DataError(
                f"{draw.who}: the package returned {chosen.size - indices.size} repeated cells among "
                f"{chosen.size}: every repulsion 1/d^alpha (alpha = {4 * dimensions}) underflowed. Lower "
                "sampler.params.n_pcs (alpha is 4 x the dimensions) or use another sampler."
            )
        return draw.sample(self.name, indices, alpha=4 * int(dimensions))


class _RandomWithScalarSingleDraw:
    """``np.random`` whose ``randint(..., size=1)`` returns the drawn value itself (see ScSampler)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(np.random, name)

    @staticmethod
    def randint(*args: Any, size: Any = None, **kwargs: Any) -> Any:
        drawn = np.random.randint(*args, size=size, **kwargs)
        return drawn[0] if size == 1 else drawn


class _NumpyForUclab:
    """numpy as the package's ``uclab`` module sees it: everything as is but ``random.randint``."""

    random = _RandomWithScalarSingleDraw()

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


@contextmanager
def _scalar_single_randint() -> Iterator[None]:
    from scsampler import uclab

    original = uclab.np
    uclab.np = _NumpyForUclab()
    try:
        yield
    finally:
        uclab.np = original
