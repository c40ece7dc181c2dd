"""Uniform sampler: a seeded simple random sample without replacement."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pydantic
import pytest
from scipy.stats import chisquare

from grnx_core.errors import DataError
from grnx_plugins.samplers.uniform import UniformSampler


def cells(n: int) -> ad.AnnData:
    return ad.AnnData(X=np.zeros((n, 3), dtype=np.float32))


def test_size_weights_and_no_repeats():
    sample = UniformSampler(fraction=0.1).sample(cells(1005), np.random.default_rng(0))
    assert sample.n_cells == 101  # round(100.5) half up
    assert sample.n_cells_total == 1005
    assert len(np.unique(sample.indices)) == sample.n_cells and np.all(np.diff(sample.indices) > 0)
    assert sample.indices.min() >= 0 and sample.indices.max() < 1005
    np.testing.assert_array_equal(sample.weights, 1.0)
    assert UniformSampler(n_cells=7).sample(cells(10), np.random.default_rng(0)).n_cells == 7
    assert UniformSampler(fraction=0.001).sample(cells(10), np.random.default_rng(0)).n_cells == 1
    np.testing.assert_array_equal(
        UniformSampler(fraction=1.0).sample(cells(10), np.random.default_rng(0)).indices, np.arange(10)
    )


def test_same_seed_same_sample():
    a = UniformSampler(n_cells=20).sample(cells(500), np.random.default_rng(3))
    b = UniformSampler(n_cells=20).sample(cells(500), np.random.default_rng(3))
    c = UniformSampler(n_cells=20).sample(cells(500), np.random.default_rng(4))
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)


def test_every_cell_is_equally_likely():
    # Inclusion counts of 20 cells over 4,000 samples of 5: each expected 4000 * 5 / 20 = 1000.
    rng = np.random.default_rng(0)
    counts = np.zeros(20)
    for _ in range(4000):
        counts[UniformSampler(n_cells=5).sample(cells(20), rng).indices] += 1
    assert chisquare(counts).pvalue > 0.001


@pytest.mark.parametrize(
    "params", [{}, {"fraction": 0}, {"fraction": 1.01}, {"fraction": 0.5, "n_cells": 3}, {"n_cells": -1}]
)
def test_bad_params(params):
    with pytest.raises(pydantic.ValidationError):
        UniformSampler(**params)


def test_more_cells_than_the_data_is_an_error():
    with pytest.raises(DataError, match="n_cells=11 is more than the 10 cells"):
        UniformSampler(n_cells=11).sample(cells(10), np.random.default_rng(0))
