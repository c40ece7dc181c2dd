"""Statistics of in silico perturbation shifts: rank-sum tests against a null that leaves the tested
gene out, down-sampling of the null with a fixed seed, Benjamini-Hochberg FDR.

Geneformer's ``InSilicoPerturberStats`` (``geneformer/in_silico_perturber_stats.py``,
``isp_stats_to_goal_state``; read at github.com/haroonshakeel/Geneformer, a mirror of
huggingface.co/ctheodoris/Geneformer) pools the shifts of *every* perturbed gene, the tested gene
included, into one "random" list, down-samples it to 100,000 with ``random.seed(42)``, and calls
``scipy.stats.ranksums(null, shifts_of_gene)`` per gene, then ``statsmodels``' ``fdr_bh``. A gene
with many detections and a large shift is then partly compared with itself, which pulls its
p-value toward 1. Here each gene's null is the pooled shifts of all *other* perturbations
(docs/methods/extractors.md#in-silico-perturbation): the pool is down-sampled once and the tested gene's own entries are
removed from the sample, so the null of every gene is a uniform random subset of the others' shifts.

The rank sums are computed from one sorted pool with ``searchsorted`` instead of ranking the
concatenation for every gene; the statistic is exactly ``scipy.stats.ranksums(x, y)`` (average
ranks for ties, no tie correction, two-sided normal p-value), checked against scipy in the tests.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def downsample(n_items: int, size: int | None, seed: int) -> np.ndarray:
    """Indices (sorted) of at most ``size`` of ``n_items`` items, drawn without replacement.

    All items when ``size`` is None or ``n_items <= size``; otherwise a uniform draw from
    ``numpy.random.default_rng(seed)`` (Geneformer: ``random.seed(42); random.sample(x, 100_000)``).
    """
    if size is None or n_items <= size:
        return np.arange(n_items)
    return np.sort(np.random.default_rng(seed).choice(n_items, size=size, replace=False))


def _groups(owner: np.ndarray, n_groups: int) -> list[np.ndarray]:
    """Positions of each owner value 0..n_groups-1 (owner -1 belongs to none)."""
    owner = np.asarray(owner, dtype=np.int64)
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(n_groups + 1))
    return [order[bounds[g] : bounds[g + 1]] for g in range(n_groups)]


def rank_sum_tests(
    values: np.ndarray,
    owner: np.ndarray,
    n_groups: int,
    pool_values: np.ndarray,
    pool_owner: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every group g: ``scipy.stats.ranksums(values[owner == g], pool_values[pool_owner != g])``.

    Returns (statistic, two-sided p-value, size of the null) per group; NaN where the group has
    no value or its null is empty. The statistic is positive when the group's values rank above
    the null (Geneformer passes the null first, which flips the sign; the p-value is the same).
    """
    values = np.asarray(values, dtype=np.float64)
    pool_values = np.asarray(pool_values, dtype=np.float64)
    pool_sorted = np.sort(pool_values)
    n_pool = len(pool_sorted)
    tested = _groups(owner, n_groups)
    own = _groups(pool_owner, n_groups)
    statistic = np.full(n_groups, np.nan)
    pvalue = np.full(n_groups, np.nan)
    n_null = np.zeros(n_groups, dtype=np.int64)
    for group in range(n_groups):
        x = values[tested[group]]
        mine = np.sort(pool_values[own[group]])
        n1, n2 = len(x), n_pool - len(mine)
        n_null[group] = n2
        if n1 == 0 or n2 == 0:
            continue
        # rank of x_i among x and the null = its rank within x + null values below it + half the ties
        below = np.searchsorted(pool_sorted, x, "left") - np.searchsorted(mine, x, "left")
        at_most = np.searchsorted(pool_sorted, x, "right") - np.searchsorted(mine, x, "right")
        rank_sum = float(np.sum(stats.rankdata(x) + below + 0.5 * (at_most - below)))
        expected = n1 * (n1 + n2 + 1) / 2.0
        z = (rank_sum - expected) / np.sqrt(n1 * n2 * (n1 + n2 + 1) / 12.0)
        statistic[group] = z
        pvalue[group] = 2.0 * stats.norm.sf(abs(z))
    return statistic, pvalue, n_null


def benjamini_hochberg(pvalues: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (``statsmodels`` ``multipletests(method="fdr_bh")``).

    NaN p-values (untestable genes) stay NaN and do not count among the tests.
    """
    pvalues = np.asarray(pvalues, dtype=np.float64)
    adjusted = np.full(pvalues.shape, np.nan)
    finite = np.flatnonzero(~np.isnan(pvalues))
    if len(finite) == 0:
        return adjusted
    order = finite[np.argsort(pvalues[finite], kind="mergesort")]
    m = len(order)
    raw = pvalues[order] * m / np.arange(1, m + 1)
    adjusted[order] = np.minimum(np.minimum.accumulate(raw[::-1])[::-1], 1.0)
    return adjusted


def group_means(values: np.ndarray, owner: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean of ``values`` per owner group, count per group); NaN mean for an empty group."""
    owner = np.asarray(owner, dtype=np.int64)
    inside = owner >= 0
    counts = np.bincount(owner[inside], minlength=n_groups)
    sums = np.bincount(
        owner[inside], weights=np.asarray(values, dtype=np.float64)[inside], minlength=n_groups
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), counts
