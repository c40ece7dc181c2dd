"""The CS-CORE estimator on a cells x genes count matrix: IRLS moments, then pairwise products.

Follows ALGORITHMS.md section 8 and the CS-CORE R package (ChangSuBiostats/CS-CORE,
``R/CSCORE_IRLS_base.R`` and ``src/CSCORE_IRLS_cpp.cpp``, version 1.1.0), whose conventions
are kept where the spec leaves them open:

- the IRLS loop runs while ``delta > eps`` and ``iteration <= n_iter`` (so at most ``n_iter + 1``
  updates, as the R loop ``while(delta > 0.05 & j <= 10)`` does); ``delta`` is the largest
  ``|log(theta / theta_prev)|`` over genes whose old and new ``theta`` are both positive, with
  ``theta_prev`` a copy taken before anything is changed (the Python port aliases it, the R code
  does not); no such gene ends the loop, as R's ``max`` of an empty set does;
- non-finite or non-positive mean weights and non-positive variance weights are set to 1;
- genes with a variance estimate <= 0 (including genes without counts) get correlation 0 with
  every gene, the diagonal is 1 and the rest is clipped to [-1, 1] (``post_process_est``);
- the test statistic uses ``S = M + s^2 sigma2`` unclipped, as the package does; where it is not
  finite (no counts, or a negative variance that makes ``S`` vanish) it is NaN, and so is its
  p-value, which is ``2 * norm.sf(|T|)`` (not ``2 * (1 - cdf)``, which is 0 past ``|T| ~ 8.3``).

Every sum over cells is a vector-matrix or matrix product over a block of genes, in float64. The
pairwise sums are four Gram matrices, ``A^T A`` with ``A = s R / w``, ``B = s^2 / w``,
``C = s R / S`` and ``D = s^2 / S``, built one gene block at a time, so the memory held is the
p x p results plus a few n x block arrays whatever the number of cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.stats import norm

from grnx_core import DataError

#: n x block float64 arrays alive at once in the pairwise step (four per block, two blocks, plus
#: the temporaries that build them); sets the block size from the memory budget.
ARRAYS_PER_BLOCK_GENE = 14


@dataclass(frozen=True)
class Moments:
    """Per-gene IRLS estimates: mean ``mu`` and variance ``sigma2`` of the underlying expression."""

    mu: np.ndarray
    sigma2: np.ndarray
    theta_median: float
    n_iterations: int
    delta: float
    converged: bool


@dataclass(frozen=True)
class CoexpressionFit:
    """CS-CORE's outputs over p genes: correlation, test statistic and what the difference test needs."""

    correlation: np.ndarray
    statistic: np.ndarray
    moments: Moments
    #: ``sqrt(sum_i s_i^4 / (S_ij S_ik))``: 1 / the null standard error of the S-weighted covariance
    #: (kept only when asked for, by the two-group difference test)
    null_precision_sqrt: np.ndarray | None
    n_negative_variance: int
    n_clipped_high: int
    n_clipped_low: int

    @property
    def pvalue(self) -> np.ndarray:
        return two_sided_pvalue(self.statistic)


def two_sided_pvalue(statistic: np.ndarray) -> np.ndarray:
    """``2 * P(Z > |T|)``; NaN statistics give NaN."""
    return 2.0 * norm.sf(np.abs(statistic))


#: the most genes in one working block (see ``block_size``)
MAX_BLOCK_GENES = 1024


def block_size(n_cells: int, n_genes: int, max_memory_bytes: float, n_square_outputs: int) -> int:
    """Genes per block so that the p x p outputs and the block arrays stay within the budget."""
    square = n_square_outputs * 8.0 * n_genes * n_genes
    per_gene = ARRAYS_PER_BLOCK_GENE * 8.0 * max(n_cells, 1)
    left = max_memory_bytes - square
    if left < per_gene:
        raise DataError(
            f"CS-CORE on {n_genes} genes x {n_cells} cells needs {square / 2**30:.2f} GiB for its "
            f"{n_square_outputs} gene x gene matrices plus {per_gene / 2**30:.3f} GiB per gene of a working "
            f"block, with {max_memory_bytes / 2**30:.2f} GiB of params.max_memory_gb left for them. Choose fewer "
            "genes (params.n_top_genes or params.genes) or raise params.max_memory_gb."
        )
    # Each pair of blocks also makes a few b x b temporaries (the Gram products); past ~1,000 genes a
    # larger block saves no BLAS time but holds more (measured at 1,994 cells x 5,000 genes: one
    # 5,000-gene block 1,067 MB traced, 1,334-gene blocks 641 MB, at the same CPU time).
    return int(max(1, min(n_genes, left // per_gene, MAX_BLOCK_GENES)))


class _Columns:
    """Dense float64 blocks of columns from a dense or sparse count matrix (CSC kept as it is)."""

    def __init__(self, counts: np.ndarray | sp.spmatrix | _Columns) -> None:
        if isinstance(counts, _Columns):
            counts = counts.counts
        self.counts = sp.csc_matrix(counts) if sp.issparse(counts) else np.asarray(counts)
        self.n_genes = self.counts.shape[1]

    def block(self, start: int, stop: int) -> np.ndarray:
        part = self.counts[:, start:stop]
        return (
            part.toarray().astype(np.float64, copy=False)
            if sp.issparse(part)
            else np.asarray(part, np.float64)
        )


def _mean_weights(m: np.ndarray, depth_sq: np.ndarray, mu: np.ndarray, theta_median: float) -> np.ndarray:
    """``w = M + s^2 mu^2 / theta_median``, non-finite or <= 0 set to 1 (the package's rule)."""
    w = m + np.outer(depth_sq, mu * mu / theta_median)
    w[~np.isfinite(w) | (w <= 0)] = 1.0
    return w


def fit_moments(
    counts: np.ndarray | sp.spmatrix | _Columns,
    depth: np.ndarray,
    *,
    genes_per_block: int,
    n_iter: int = 10,
    eps: float = 0.05,
) -> Moments:
    """IRLS estimates of the per-gene mean and variance of the underlying expression."""
    columns = _Columns(counts)
    depth = np.asarray(depth, dtype=np.float64)
    depth_sq = depth * depth
    depth_4 = depth_sq * depth_sq
    blocks = [
        (start, min(start + genes_per_block, columns.n_genes))
        for start in range(0, columns.n_genes, genes_per_block)
    ]

    mu = np.empty(columns.n_genes)
    sigma2 = np.empty(columns.n_genes)
    for start, stop in blocks:
        x = columns.block(start, stop)
        mu[start:stop] = depth @ x / depth_sq.sum()
        m = np.outer(depth, mu[start:stop])
        sigma2[start:stop] = depth_sq @ ((x - m) ** 2 - m) / depth_4.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = mu * mu / sigma2

    iteration, delta = 0, np.inf
    while delta > eps and iteration <= n_iter:
        theta_previous = theta.copy()
        theta_median = _positive_median(theta, columns.n_genes)
        for start, stop in blocks:
            x = columns.block(start, stop)
            m = np.outer(depth, mu[start:stop])
            inverse_w = 1.0 / _mean_weights(m, depth_sq, mu[start:stop], theta_median)
            mu[start:stop] = depth @ (x * inverse_w) / (depth_sq @ inverse_w)
            m = np.outer(depth, mu[start:stop])
            h = (m * m / theta_median + m) ** 2
            h[h <= 0] = 1.0
            inverse_h = 1.0 / h
            sigma2[start:stop] = depth_sq @ (((x - m) ** 2 - m) * inverse_h) / (depth_4 @ inverse_h)
        with np.errstate(divide="ignore", invalid="ignore"):
            theta = mu * mu / sigma2
        iteration += 1
        both = (theta > 0) & (theta_previous > 0)
        delta = float(np.max(np.abs(np.log(theta[both] / theta_previous[both])))) if both.any() else -np.inf
    theta_median = _positive_median(theta, columns.n_genes)
    return Moments(
        mu=mu,
        sigma2=sigma2,
        theta_median=theta_median,
        n_iterations=iteration,
        delta=delta,
        converged=not (iteration > n_iter and delta > eps),
    )


def _positive_median(theta: np.ndarray, n_genes: int) -> float:
    positive = theta[theta > 0]
    if not len(positive):
        raise DataError(
            f"CS-CORE: none of the {n_genes} genes has a positive variance estimate beyond Poisson noise, "
            "so there is no co-expression to estimate (the IRLS weights need the median of "
            "mean^2 / variance over such genes). Use more cells or more expressed genes "
            "(params.n_top_genes), and check that the layer holds raw UMI counts."
        )
    return float(np.median(positive))


def fit_coexpression(
    counts: np.ndarray | sp.spmatrix,
    depth: np.ndarray,
    *,
    max_memory_bytes: float,
    n_iter: int = 10,
    eps: float = 0.05,
    keep_null_precision: bool = False,
) -> CoexpressionFit:
    """CS-CORE co-expression (correlation), its test statistic, and the moments, over the columns.

    ``depth`` is each cell's total count over every gene of the data, positive for every row.
    ``max_memory_bytes`` bounds the p x p results plus the working blocks (it sets the block size).
    """
    n_cells, n_genes = counts.shape
    n_square = 3 if keep_null_precision else 2
    genes_per_block = block_size(n_cells, n_genes, max_memory_bytes, n_square)
    columns = _Columns(counts)  # one CSC copy of CSR input, shared by both steps
    moments = fit_moments(columns, depth, genes_per_block=genes_per_block, n_iter=n_iter, eps=eps)
    depth = np.asarray(depth, dtype=np.float64)

    def factors(start: int, stop: int) -> tuple[np.ndarray, ...]:
        x = columns.block(start, stop)
        mu, sigma2 = moments.mu[start:stop], moments.sigma2[start:stop]
        m = np.outer(depth, mu)
        r = x - m
        del x
        inverse_w = 1.0 / _mean_weights(m, depth * depth, mu, moments.theta_median)
        with np.errstate(divide="ignore", invalid="ignore"):
            inverse_s = 1.0 / (m + np.outer(depth * depth, sigma2))
        del m
        scale, scale_sq = depth[:, None], (depth * depth)[:, None]
        return scale * r * inverse_w, scale_sq * inverse_w, scale * r * inverse_s, scale_sq * inverse_s

    covariance = np.empty((n_genes, n_genes))
    statistic = np.empty((n_genes, n_genes))
    precision_sqrt = np.empty((n_genes, n_genes)) if keep_null_precision else None
    starts = list(range(0, n_genes, genes_per_block))
    with np.errstate(divide="ignore", invalid="ignore"):
        for a, start_a in enumerate(starts):
            stop_a = min(start_a + genes_per_block, n_genes)
            left = factors(start_a, stop_a)
            for start_b in starts[a:]:
                stop_b = min(start_b + genes_per_block, n_genes)
                right = left if start_b == start_a else factors(start_b, stop_b)
                block_a, block_b = slice(start_a, stop_a), slice(start_b, stop_b)
                covariance[block_a, block_b] = _gram(left[0], right[0]) / _gram(left[1], right[1])
                root = np.sqrt(_gram(left[3], right[3]))
                statistic[block_a, block_b] = _gram(left[2], right[2]) / root
                if precision_sqrt is not None:
                    precision_sqrt[block_a, block_b] = root
                for square in (covariance, statistic, precision_sqrt):
                    if square is None:
                        continue
                    if start_b == start_a:
                        _mirror_upper(square[block_a, block_a])
                    else:
                        square[block_b, block_a] = square[block_a, block_b].T
                del right
    statistic[~np.isfinite(statistic)] = np.nan

    correlation, n_negative, n_high, n_low = _correlation(covariance, moments.sigma2)
    return CoexpressionFit(
        correlation=correlation,
        statistic=statistic,
        moments=moments,
        null_precision_sqrt=precision_sqrt,
        n_negative_variance=n_negative,
        n_clipped_high=n_high,
        n_clipped_low=n_low,
    )


def _gram(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``left^T right``; numpy computes a diagonal block (``right is left``) with syrk, at half the cost."""
    return left.T @ right


def _mirror_upper(block: np.ndarray) -> None:
    """Copy the strict upper triangle of a square block onto its lower one, in place (exact symmetry)."""
    for row in range(1, len(block)):
        block[row, :row] = block[:row, row]


def _correlation(covariance: np.ndarray, sigma2: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    """``sigma_jk / sqrt(sigma2_j sigma2_k)`` in place of ``covariance``, post-processed as CS-CORE does."""
    valid = np.isfinite(sigma2) & (sigma2 > 0)
    sigma = np.sqrt(np.where(valid, sigma2, 1.0))
    correlation = covariance
    correlation /= np.outer(sigma, sigma)  # sigma_j * sigma_k: one rounding, so the result stays symmetric
    correlation[~valid, :] = 0.0
    correlation[:, ~valid] = 0.0
    np.fill_diagonal(correlation, 1.0)
    # symmetric with 1 on the diagonal: each out-of-range pair is counted twice
    n_high = int(np.count_nonzero(correlation > 1)) // 2
    n_low = int(np.count_nonzero(correlation < -1)) // 2
    np.clip(correlation, -1.0, 1.0, out=correlation)
    return correlation, int((~valid).sum()), n_high, n_low
