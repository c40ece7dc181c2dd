"""Stratified sampling: a simple random sample within each group of an obs column (label, cell type)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from grnx_core import CellSample, Sampler
from grnx_core.errors import DataError
from grnx_plugins.samplers._sample_size import SampleSizeParams, sample_size

if TYPE_CHECKING:
    import anndata


class StratifiedSampler(Sampler):
    """Draws a fixed number of cells per stratum (group of ``obs[key]``), uniformly within each.

    Allocation of the total ``n`` over strata of sizes ``N_s``:

    - ``proportional``: ``n_s`` as close as possible to ``n N_s / N`` (the sample keeps the group
      shares of the data);
    - ``equal``: ``n / S`` per stratum, strata smaller than that give all their cells and the rest is
      shared among the others (water-filling), so rare groups are represented as well as common ones.

    Both raise every stratum to at least ``min(min_per_stratum, N_s)`` and round with largest
    remainders so the total is exactly ``n``. Weights are 1, or with ``design_weights`` the inverse
    inclusion rate ``N_s / n_s`` scaled to mean 1 over the sample, which makes weighted sample means
    estimate whole-data means.
    """

    name = "stratified"
    description = "Random sample within each group of an obs column, proportional or equal allocation."
    reference = "https://doi.org/10.1002/9781118162934"  # Cochran, Sampling Techniques, ch. 5

    class Params(SampleSizeParams):
        key: str = Field(description="obs column whose groups are the strata (e.g. a label or cell type)")
        allocation: Literal["proportional", "equal"] = Field(
            "proportional", description="proportional to group size, or equal per group"
        )
        min_per_stratum: int = Field(
            0, ge=0, description="at least this many cells from every group (all of a smaller group)"
        )
        design_weights: bool = Field(
            False, description="weight cells by N_s/n_s (mean 1) instead of 1, for unbiased whole-data means"
        )

    def sample(self, adata: anndata.AnnData, rng: np.random.Generator) -> CellSample:
        who = "sampler 'stratified'"
        n_obs = adata.n_obs
        n_draw = sample_size(n_obs, self.fraction, self.n_cells, who)
        if self.key not in adata.obs.columns:
            raise DataError(
                f"{who}: obs column {self.key!r} (sampler.params.key) not found. Available: "
                f"{', '.join(map(str, adata.obs.columns[:20])) or 'none'}."
            )
        column = adata.obs[self.key]
        missing = column.isna().to_numpy()
        if missing.any():
            raise DataError(
                f"{who}: obs[{self.key!r}] is missing for {int(missing.sum())} cells (first: "
                f"{adata.obs_names[np.flatnonzero(missing)[0]]!r}); every cell needs a stratum. Fill or "
                f"drop those cells, or stratify by another column."
            )
        codes, strata = pd.factorize(column, sort=True)
        sizes = np.bincount(codes, minlength=len(strata))
        floors = np.minimum(self.min_per_stratum, sizes)
        if floors.sum() > n_draw:
            raise DataError(
                f"{who}: min_per_stratum={self.min_per_stratum} over {len(strata)} groups of "
                f"obs[{self.key!r}] needs {int(floors.sum())} cells, more than the {n_draw} requested. "
                f"Lower min_per_stratum or sample more cells."
            )
        base = sizes.astype(np.float64) if self.allocation == "proportional" else np.ones(len(strata))
        counts = allocate(n_draw, sizes, base, floors)

        order = np.argsort(codes, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        chosen, weights = [], []
        for s in range(len(strata)):
            members = order[bounds[s] : bounds[s + 1]]
            pick = rng.choice(members, size=int(counts[s]), replace=False)
            chosen.append(pick)
            weights.append(np.full(pick.size, sizes[s] / counts[s] if counts[s] else 0.0))
        indices = np.concatenate(chosen)
        weights = np.concatenate(weights)
        if self.design_weights:
            weights = weights * (n_draw / n_obs)
        else:
            weights = np.ones_like(weights)
        order_out = np.argsort(indices)

        info: dict[str, float | int | str] = {
            "sampler": self.name,
            "key": self.key,
            "allocation": self.allocation,
            "n_strata": len(strata),
            "n_cells_sampled": int(n_draw),
            "fraction_sampled": n_draw / n_obs,
        }
        for label, count in zip(strata, counts):
            info[f"n_sampled[{label}]"] = int(count)
        return CellSample(
            indices=indices[order_out], weights=weights[order_out], n_cells_total=n_obs, info=info
        )


def allocate(total: int, sizes: np.ndarray, base: np.ndarray, floors: np.ndarray) -> np.ndarray:
    """Integer counts ``floors <= n_s <= sizes`` summing to ``total``, as close as possible to ``t base_s``.

    Real-valued targets ``a_s = clip(t base_s, floors_s, sizes_s)`` with ``t`` found by bisection so
    that ``sum a_s = total`` (water-filling), then largest-remainder rounding.
    """
    sizes = sizes.astype(np.float64)

    def filled(level: float) -> np.ndarray:
        return np.clip(level * base, floors, sizes)

    low, high = 0.0, 1.0
    while filled(high).sum() < total:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if filled(middle).sum() < total:
            low = middle
        else:
            high = middle
    target = filled(high)
    counts = np.minimum(np.floor(target + 1e-9), sizes).astype(np.int64)
    counts = np.maximum(counts, floors.astype(np.int64))
    short = total - int(counts.sum())
    if short > 0:
        remainder = np.where(counts < sizes, target - counts, -np.inf)
        # Largest remainders first; ties go to the first stratum (sorted labels) for determinism.
        for s in np.argsort(-remainder, kind="stable")[:short]:
            counts[s] += 1
    elif short < 0:
        excess = np.where(counts > floors, counts - target, -np.inf)
        for s in np.argsort(-excess, kind="stable")[:-short]:
            counts[s] -= 1
    return counts
