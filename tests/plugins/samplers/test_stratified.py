"""Stratified sampler: counts per group follow the allocation, cells are uniform within groups."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pydantic
import pytest

from grnx_core.errors import DataError
from grnx_plugins.samplers.stratified import StratifiedSampler, allocate


def labelled(sizes: dict[str, int], seed: int = 0) -> ad.AnnData:
    labels = np.concatenate([[name] * size for name, size in sizes.items()])
    labels = np.random.default_rng(seed).permutation(labels)
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels)}, index=[f"c{i}" for i in range(labels.size)])
    return ad.AnnData(X=np.zeros((labels.size, 2), dtype=np.float32), obs=obs)


def drawn_per_group(adata: ad.AnnData, sample) -> dict[str, int]:
    return adata.obs["cell_type"].iloc[sample.indices].value_counts().to_dict()


def test_proportional_allocation_keeps_group_shares():
    adata = labelled({"B": 600, "T": 300, "NK": 100})
    sample = StratifiedSampler(key="cell_type", fraction=0.1).sample(adata, np.random.default_rng(0))
    assert drawn_per_group(adata, sample) == {"B": 60, "T": 30, "NK": 10}
    assert sample.info["n_sampled[NK]"] == 10
    np.testing.assert_array_equal(sample.weights, 1.0)
    assert len(np.unique(sample.indices)) == 100 and np.all(np.diff(sample.indices) > 0)


def test_proportional_rounding_uses_largest_remainders():
    # Targets 10 * (5, 3, 2) / 10 * 0.7 = 3.5, 2.1, 1.4 -> floors 3, 2, 1 and the leftover cell to B.
    adata = labelled({"B": 50, "T": 30, "NK": 20})
    sample = StratifiedSampler(key="cell_type", n_cells=7).sample(adata, np.random.default_rng(0))
    assert drawn_per_group(adata, sample) == {"B": 4, "T": 2, "NK": 1}


def test_equal_allocation_caps_small_groups_and_shares_the_rest():
    adata = labelled({"B": 600, "T": 300, "NK": 10})
    sample = StratifiedSampler(key="cell_type", n_cells=90, allocation="equal").sample(
        adata, np.random.default_rng(0)
    )
    # 30 each is the target; NK has 10, so B and T take 40 each.
    assert drawn_per_group(adata, sample) == {"B": 40, "T": 40, "NK": 10}


def test_min_per_stratum_and_design_weights():
    adata = labelled({"B": 900, "T": 95, "NK": 5})
    sampler = StratifiedSampler(key="cell_type", n_cells=50, min_per_stratum=5, design_weights=True)
    sample = sampler.sample(adata, np.random.default_rng(0))
    counts = drawn_per_group(adata, sample)
    assert counts["NK"] == 5 and sum(counts.values()) == 50
    # Design weights N_s / n_s (mean 1 over the sample) make weighted shares the whole-data shares.
    labels = adata.obs["cell_type"].to_numpy()[sample.indices]
    assert sample.weights.mean() == pytest.approx(1.0)
    for name, size in {"B": 900, "T": 95, "NK": 5}.items():
        assert np.sum(sample.weights[labels == name]) / np.sum(sample.weights) == pytest.approx(size / 1000)


def test_within_group_draws_are_uniform_and_seeded():
    adata = labelled({"A": 10, "B": 10})
    sampler = StratifiedSampler(key="cell_type", n_cells=4)
    counts = np.zeros(20)
    rng = np.random.default_rng(1)
    for _ in range(2000):
        counts[sampler.sample(adata, rng).indices] += 1
    # Each cell expected 2000 * 2 / 10 = 400 times.
    assert np.all(np.abs(counts - 400) < 5 * np.sqrt(400 * 0.8))
    first = sampler.sample(adata, np.random.default_rng(9))
    again = sampler.sample(adata, np.random.default_rng(9))
    np.testing.assert_array_equal(first.indices, again.indices)


def test_allocate_properties():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(1, 50, rng.integers(1, 8))
        total = int(rng.integers(1, sizes.sum() + 1))
        floors = np.minimum(rng.integers(0, 3), sizes)
        if floors.sum() > total:
            continue
        for base in (sizes.astype(float), np.ones(sizes.size)):
            counts = allocate(total, sizes, base, floors)
            assert counts.sum() == total
            assert np.all(counts >= floors) and np.all(counts <= sizes)


def test_errors():
    adata = labelled({"B": 10, "T": 10})
    with pytest.raises(DataError, match="obs column 'celltype'.*not found"):
        StratifiedSampler(key="celltype", n_cells=4).sample(adata, np.random.default_rng(0))
    adata.obs["with_gaps"] = ["x"] * 19 + [None]
    with pytest.raises(DataError, match="missing for 1 cells"):
        StratifiedSampler(key="with_gaps", n_cells=4).sample(adata, np.random.default_rng(0))
    with pytest.raises(DataError, match="min_per_stratum=3"):
        StratifiedSampler(key="cell_type", n_cells=4, min_per_stratum=3).sample(
            adata, np.random.default_rng(0)
        )
    with pytest.raises(pydantic.ValidationError):
        StratifiedSampler(n_cells=4)
    with pytest.raises(pydantic.ValidationError):
        StratifiedSampler(key="cell_type", n_cells=4, allocation="neyman")
