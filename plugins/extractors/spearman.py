"""Spearman co-expression: Pearson correlation of per-gene (weighted) mid-ranks."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from grnx_plugins.extractors.pearson import PearsonExtractor


def weighted_midranks(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each value's weighted mid-rank: the weight of the smaller values plus half that of its ties.

    With equal weights of 1 this is the average rank minus 1/2 (``scipy.stats.rankdata``,
    method "average"); with integer weights it is, up to the same constant, the average rank the
    value would get with each cell repeated ``weight`` times.
    """
    distinct, position = np.unique(values, return_inverse=True)
    mass = np.bincount(position.ravel(), weights=weights, minlength=len(distinct))
    return (np.cumsum(mass) - mass / 2)[position.ravel()]


def rank_matrix(matrix: np.ndarray | sp.spmatrix, weights: np.ndarray) -> np.ndarray | sp.csc_matrix:
    """Per-gene weighted mid-ranks of a cells x genes matrix, each gene shifted so 0 ranks 0.

    The shift is a constant per gene, which a correlation ignores; it keeps zeros at zero, so a
    sparse matrix stays sparse (the rank of a gene's zeros is computed from their total weight).
    """
    weights = np.asarray(weights, dtype=np.float64)
    if not sp.issparse(matrix):
        dense = np.asarray(matrix, dtype=np.float64)
        ranks = np.empty_like(dense)
        for gene in range(dense.shape[1]):
            ranks[:, gene] = _zero_shifted_midranks(dense[:, gene], weights, 0.0)
        return ranks
    csc = sp.csc_matrix(matrix, dtype=np.float64)
    csc.sort_indices()
    total = weights.sum()
    ranked = csc.copy()
    for gene in range(csc.shape[1]):
        start, stop = csc.indptr[gene], csc.indptr[gene + 1]
        stored_weights = weights[csc.indices[start:stop]]
        zero_weight = max(total - stored_weights.sum(), 0.0)  # the cells not stored are zeros
        ranked.data[start:stop] = _zero_shifted_midranks(csc.data[start:stop], stored_weights, zero_weight)
    return ranked


def _zero_shifted_midranks(values: np.ndarray, weights: np.ndarray, zero_weight: float) -> np.ndarray:
    """Weighted mid-ranks of ``values`` and ``zero_weight`` more cells at 0, minus the rank of 0."""
    ranks = weighted_midranks(np.append(values, 0.0), np.append(weights, zero_weight))
    return ranks[:-1] - ranks[-1]


class SpearmanExtractor(PearsonExtractor):
    """Spearman co-expression: the Pearson correlation (see PearsonExtractor) of per-gene ranks.

    Ranks are mid-ranks (ties, zeros included, share one), computed within the cells correlated
    (the sample, or each group). With ``weighting: sample`` they are weighted mid-ranks -- the
    weight of the cells with smaller values plus half the weight of the ties, i.e. ranks in the
    weighted empirical distribution the weights stand for -- and their correlation is weighted by
    the same weights. So integer weights give exactly the Spearman correlation of the cells each
    repeated ``weight`` times, and equal weights give ``scipy.stats.spearmanr``. (Ranking the
    sample's values without weights and then correlating with weights would not: a cell of
    weight 5 would move only one rank.) Sparse data stays sparse: each gene's ranks are shifted
    so its zeros rank 0, a constant the correlation ignores.
    """

    name = "spearman"
    description = "Gene pairs ranked by Spearman co-expression, or by its difference between two groups."
    reference = "https://doi.org/10.1038/s41592-019-0690-6"

    def transform_values(self, matrix, weights: np.ndarray):
        # Zero-weight cells carry no mass: they do not move the others' ranks (and are dropped).
        return rank_matrix(matrix, weights if self.weighting == "sample" else np.ones(matrix.shape[0]))
