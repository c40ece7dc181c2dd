"""spearman against scipy.stats.spearmanr, with and without per-cell weights, dense and sparse."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import rankdata, spearmanr

from grnx_core import CellSample, RunContext
from grnx_plugins.extractors.spearman import SpearmanExtractor, rank_matrix, weighted_midranks


def _counts(seed: int = 0, n_cells: int = 60, n_genes: int = 6) -> np.ndarray:
    """Small counts with many ties (zeros and small integers), as single-cell data has."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.gamma(0.8, 1.0, size=(1, n_genes)), size=(n_cells, n_genes)).astype(float)
    counts[:, 1] += counts[:, 0]  # a planted monotone pair
    return counts


def _adata(counts: np.ndarray, sparse: bool) -> anndata.AnnData:
    n_cells, n_genes = counts.shape
    return anndata.AnnData(
        X=sp.csr_matrix(counts) if sparse else counts,
        obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]),
    )


def _score_matrix(interactions, n_genes: int) -> np.ndarray:
    matrix = np.eye(n_genes)
    table = interactions.table
    for source, target, value in zip(table["source"], table["target"], table["score"], strict=True):
        i, j = int(source[1:]), int(target[1:])
        matrix[i, j] = matrix[j, i] = value
    return matrix


def test_weighted_midranks_with_equal_weights_are_average_ranks_minus_a_half():
    values = np.array([3.0, 0.0, 0.0, 5.0, 3.0, 0.0, 1.0])
    assert np.array_equal(weighted_midranks(values, np.ones(7)), rankdata(values) - 0.5)


@pytest.mark.parametrize("sparse", [False, True])
def test_spearman_matches_scipy_on_a_small_matrix_with_ties(sparse):
    counts = _counts()
    interactions = SpearmanExtractor(rank_by="value").extract(RunContext(adata=_adata(counts, sparse)))
    assert np.allclose(_score_matrix(interactions, 6), spearmanr(counts).statistic, atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True])
def test_sparse_ranks_keep_zeros_and_differ_from_dense_by_a_constant(sparse):
    counts = _counts(seed=1)
    ranks = rank_matrix(sp.csr_matrix(counts) if sparse else counts, np.ones(len(counts)))
    dense_ranks = ranks.toarray() if sparse else ranks
    assert np.all(dense_ranks[counts == 0] == 0)
    shift = rankdata(counts, axis=0) - dense_ranks
    assert np.allclose(shift, shift[0], atol=1e-12)
    if sparse:
        assert sp.issparse(ranks) and ranks.nnz == np.count_nonzero(counts)


@pytest.mark.parametrize("sparse", [False, True])
def test_integer_weights_give_the_spearman_of_the_repeated_cells(sparse):
    counts = _counts(seed=2)
    weights = np.random.default_rng(3).integers(0, 4, size=len(counts)).astype(float)
    sample = CellSample(indices=np.arange(len(counts)), weights=weights, n_cells_total=len(counts))
    context = RunContext(adata=_adata(counts, sparse), sample=sample)
    weighted = _score_matrix(SpearmanExtractor(rank_by="value", weighting="sample").extract(context), 6)
    repeated = np.repeat(counts, weights.astype(int), axis=0)
    assert np.allclose(weighted, spearmanr(repeated).statistic, atol=1e-12)
    # Ranking without weights and then weighting the correlation is a different statistic.
    plain_ranks = rankdata(counts, axis=0)
    covariance = np.cov(plain_ranks, rowvar=False, aweights=weights)
    naive = covariance / np.sqrt(np.outer(np.diag(covariance), np.diag(covariance)))
    assert not np.allclose(weighted, naive, atol=1e-3)
    # Scaling every weight changes nothing.
    scaled = CellSample(indices=sample.indices, weights=weights * 0.37, n_cells_total=len(counts))
    rescaled = SpearmanExtractor(rank_by="value", weighting="sample").extract(
        RunContext(adata=_adata(counts, sparse), sample=scaled)
    )
    assert np.allclose(_score_matrix(rescaled, 6), weighted, atol=1e-12)


def test_sampled_cells_are_ranked_among_themselves():
    counts = _counts(seed=4, n_cells=90)
    indices = np.arange(0, 90, 2)
    sample = CellSample(indices=indices, weights=np.ones(len(indices)), n_cells_total=90)
    interactions = SpearmanExtractor(rank_by="value").extract(
        RunContext(adata=_adata(counts, True), sample=sample)
    )
    assert np.allclose(_score_matrix(interactions, 6), spearmanr(counts[indices]).statistic, atol=1e-12)
