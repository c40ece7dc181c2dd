"""The CS-CORE estimator on a cells x genes count matrix: IRLS moments, then pairwise products.

Follows docs/methods/extractors.md#cs-core and the CS-CORE R package (ChangSuBiostats/CS-CORE,
``R/CSCORE_IRLS_base.R`` and ``src/CSCORE_IRLS_cpp.cpp``, version 1.1.0), whose conventions
are kept where the method leaves them open:

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

The sums are the package's elementwise terms in float64, in another order, computed by compiled
kernels that read the sparse counts as they are. The results agree with the package to rounding:
against CS-CORE_python's ``CSCORE`` (given float64 depths) on 1,994 cells x 5,000 genes the
correlations differ by at most 4e-12, the p-values by 1e-14 (``benchmarks/bench_cscore.py``); against
the same sums in 80-bit extended precision, on 1,994 x 1,000, grnx's correlations err by at most
3e-14 and the package's by 6e-13 (the sums of the IRLS are compensated, Neumaier, as the variance
is a difference of large sums).

- every IRLS weight (``w``, ``h``) depends on a cell only through its depth ``s``, so it is computed
  once per distinct depth (depths are integer totals: 44,721 simulated cells of ~3,000 UMIs have
  7,563 distinct ones); a sum over cells of weights alone is a sum over depths, each times its
  number of cells, and a sum of a term holding the count ``x`` is the sum over the stored counts
  plus, for each depth, the term at ``x = 0`` times the number of cells of that depth whose count is
  not stored (an exact count, so no large sums cancel). The IRLS never makes the counts dense.
- the pairwise sums are four Gram matrices, ``A^T A`` with ``A = s R / w``, ``B = s^2 / w``,
  ``C = s R / S`` and ``D = s^2 / S``: ``A`` and ``C`` over cells (``R = X - M`` is non-zero almost
  everywhere), ``B`` and ``D`` over distinct depths with rows scaled by the square root of their
  number of cells, built one gene block at a time, so the memory held is the p x p results plus a
  few n x block arrays whatever the number of cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp
from scipy.special import ndtr

from grnx_core import DataError

#: float64 arrays of a gene's column alive at once in the pairwise step: over cells, A and C of two
#: blocks; over distinct depths, B and D of two blocks and the weights that build them. Sets the
#: block size from the memory budget.
CELL_ARRAYS_PER_BLOCK_GENE, DEPTH_ARRAYS_PER_BLOCK_GENE = 4, 8


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
    """``2 * P(Z > |T|)``, as ``2 * scipy.stats.norm.sf(|T|)`` (which is ``2 * ndtr(-|T|)``) gives it,
    in one new array (``norm.sf`` makes several of the statistic's size); NaN statistics give NaN."""
    pvalue = np.abs(statistic)
    np.negative(pvalue, out=pvalue)
    ndtr(pvalue, out=pvalue)
    pvalue *= 2.0
    return pvalue


#: the most genes in one working block (see ``block_size``)
MAX_BLOCK_GENES = 1024


def bytes_per_block_gene(n_cells: int, n_depths: int) -> float:
    """Working memory of one gene of a block in the pairwise step (``n_depths``: distinct depths)."""
    return 8.0 * (
        CELL_ARRAYS_PER_BLOCK_GENE * max(n_cells, 1) + DEPTH_ARRAYS_PER_BLOCK_GENE * max(n_depths, 1)
    )


def block_size(
    n_cells: int, n_genes: int, max_memory_bytes: float, n_square_outputs: int, n_depths: int | None = None
) -> int:
    """Genes per block so that the p x p outputs and the block arrays stay within the budget.

    ``n_depths`` is the number of distinct depths (at most ``n_cells``, which it defaults to).
    """
    square = n_square_outputs * 8.0 * n_genes * n_genes
    per_gene = bytes_per_block_gene(n_cells, n_cells if n_depths is None else n_depths)
    left = max_memory_bytes - square
    if left < per_gene:
        raise DataError(
            f"CS-CORE on {n_genes} genes x {n_cells} cells needs {square / 2**30:.2f} GiB for its "
            f"{n_square_outputs} gene x gene matrices plus {per_gene / 2**30:.3f} GiB per gene of a working "
            f"block, with {max_memory_bytes / 2**30:.2f} GiB of params.max_memory_gb left for them. Choose fewer "
            "genes (params.n_top_genes or params.genes) or raise params.max_memory_gb."
        )
    # Each pair of blocks also makes a few b x b temporaries (the Gram products); past ~1,000 genes a
    # larger block saves no BLAS time but holds more.
    return int(max(1, min(n_genes, left // per_gene, MAX_BLOCK_GENES)))


class _DepthGroups:
    """The cells' distinct depths: every weight of CS-CORE depends on a cell only through its depth."""

    def __init__(self, depth: np.ndarray) -> None:
        self.depth, self.of_cell, n_cells = np.unique(depth, return_inverse=True, return_counts=True)
        self.depth_sq = self.depth * self.depth
        self.n_cells = n_cells.astype(np.float64)
        self.n_depths = len(self.depth)


class _Columns:
    """A count matrix as canonical CSC (CSC input kept as it is): per gene, its sorted stored counts."""

    def __init__(self, counts: np.ndarray | sp.spmatrix | _Columns) -> None:
        if isinstance(counts, _Columns):
            counts = counts.counts
        matrix = sp.csc_matrix(counts)
        if not matrix.has_canonical_format:  # the kernels need sorted rows, each count stored once
            matrix = matrix.copy()
            matrix.sum_duplicates()
        self.counts: sp.csc_matrix = matrix
        self.n_genes = matrix.shape[1]

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.counts.indptr, self.counts.indices, self.counts.data


def _mean_weights(m: np.ndarray, depth_sq: np.ndarray, mu: np.ndarray, theta_median: float) -> np.ndarray:
    """``w = M + s^2 mu^2 / theta_median``, non-finite or <= 0 set to 1 (the package's rule)."""
    w = m + np.outer(depth_sq, mu * mu / theta_median)
    w[~np.isfinite(w) | (w <= 0)] = 1.0
    return w


@numba.njit(cache=True, nogil=True, inline="always")
def _add(total, carry, term):
    """Neumaier's compensated sum, one term: the variance sums are differences of large sums (total
    minus Poisson noise), where a plain running sum loses digits that numpy's pairwise sums keep."""
    updated = total + term
    if abs(total) >= abs(term):
        carry += (total - updated) + term
    else:
        carry += (term - updated) + total
    return updated, carry


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _initial_moments(indptr, indices, data, depth, of_cell, depth_values, n_cells, sums, mu, sigma2):
    """``mu = sum s x / sum s^2``, ``sigma2 = sum s^2 ((x - M)^2 - M) / sum s^4``, per gene, in place."""
    zeros = np.empty(len(depth_values))
    for gene in range(len(mu)):
        lo, hi = indptr[gene], indptr[gene + 1]
        numerator, carry = 0.0, 0.0
        for k in range(lo, hi):
            numerator, carry = _add(numerator, carry, depth[indices[k]] * data[k])
        mean = (numerator + carry) / sums[0]
        zeros[:] = n_cells
        total, carry = 0.0, 0.0
        for k in range(lo, hi):
            cell = indices[k]
            s = depth[cell]
            m = s * mean
            r = data[k] - m
            total, carry = _add(total, carry, s * s * (r * r - m))
            zeros[of_cell[cell]] -= 1.0
        for group in range(len(depth_values)):
            if zeros[group] > 0:
                s = depth_values[group]
                m = s * mean
                total, carry = _add(total, carry, zeros[group] * (s * s * (m * m - m)))
        mu[gene] = mean
        sigma2[gene] = (total + carry) / sums[1]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _irls_update(indptr, indices, data, depth, of_cell, depth_values, n_cells, theta_median, mu, sigma2):
    """One IRLS update of every gene's ``mu`` (weights ``w`` of the old ``mu``), then ``sigma2``, in place."""
    n_depths = len(depth_values)
    inverse = np.empty(n_depths)
    zeros = np.empty(n_depths)
    for gene in range(len(mu)):
        lo, hi = indptr[gene], indptr[gene + 1]
        mean = mu[gene]
        # w = M + s^2 mu^2 / theta_median, non-finite or <= 0 set to 1; x / w is 0 where x is
        weight = mean * mean / theta_median
        denominator, carry = 0.0, 0.0
        for group in range(n_depths):
            s = depth_values[group]
            w = s * mean + s * s * weight
            if not (np.isfinite(w) and w > 0):
                w = 1.0
            inverse[group] = 1.0 / w
            denominator, carry = _add(denominator, carry, n_cells[group] * (s * s * inverse[group]))
        denominator += carry
        numerator, carry = 0.0, 0.0
        for k in range(lo, hi):
            cell = indices[k]
            numerator, carry = _add(numerator, carry, depth[cell] * (data[k] * inverse[of_cell[cell]]))
        mean = (numerator + carry) / denominator
        # h = (M^2 / theta_median + M)^2, <= 0 set to 1
        denominator, carry = 0.0, 0.0
        for group in range(n_depths):
            s = depth_values[group]
            m = s * mean
            q = m * m / theta_median + m
            h = q * q
            if h <= 0:
                h = 1.0
            inverse[group] = 1.0 / h
            denominator, carry = _add(denominator, carry, n_cells[group] * (s * s * s * s * inverse[group]))
        denominator += carry
        zeros[:] = n_cells
        total, carry = 0.0, 0.0
        for k in range(lo, hi):
            cell = indices[k]
            group = of_cell[cell]
            s = depth[cell]
            m = s * mean
            r = data[k] - m
            total, carry = _add(total, carry, s * s * ((r * r - m) * inverse[group]))
            zeros[group] -= 1.0
        for group in range(n_depths):
            if zeros[group] > 0:
                s = depth_values[group]
                m = s * mean
                total, carry = _add(total, carry, zeros[group] * (s * s * ((m * m - m) * inverse[group])))
        mu[gene] = mean
        sigma2[gene] = (total + carry) / denominator


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _fill_residuals(
    indptr, indices, data, depth, of_cell, depth_values, start, mu, sigma2, theta_median, a, c
):
    """Rows ``j`` of ``a = (s R / w)^T`` and ``c = (s R / S)^T`` for the genes ``start + j``."""
    n_depths = len(depth_values)
    inverse_w = np.empty(n_depths)
    inverse_s = np.empty(n_depths)
    for j in range(a.shape[0]):
        gene = start + j
        mean, variance = mu[gene], sigma2[gene]
        weight = mean * mean / theta_median
        for group in range(n_depths):
            s = depth_values[group]
            m = s * mean
            w = m + s * s * weight
            if not (np.isfinite(w) and w > 0):
                w = 1.0
            inverse_w[group] = 1.0 / w
            inverse_s[group] = 1.0 / (m + s * s * variance)
        # every cell as if its count were 0, then the stored counts over them
        for cell in range(len(depth)):
            s = depth[cell]
            group = of_cell[cell]
            scaled = s * -(s * mean)
            a[j, cell] = scaled * inverse_w[group]
            c[j, cell] = scaled * inverse_s[group]
        for k in range(indptr[gene], indptr[gene + 1]):
            cell = indices[k]
            s = depth[cell]
            group = of_cell[cell]
            scaled = s * (data[k] - s * mean)
            a[j, cell] = scaled * inverse_w[group]
            c[j, cell] = scaled * inverse_s[group]


def fit_moments(
    counts: np.ndarray | sp.spmatrix | _Columns,
    depth: np.ndarray,
    *,
    n_iter: int = 10,
    eps: float = 0.05,
) -> Moments:
    """IRLS estimates of the per-gene mean and variance of the underlying expression."""
    columns = _Columns(counts)
    depth = np.asarray(depth, dtype=np.float64)
    groups = _DepthGroups(depth)
    depth_sq = depth * depth
    sums = np.array([depth_sq.sum(), (depth_sq * depth_sq).sum()])
    per_depth = (groups.of_cell, groups.depth, groups.n_cells)
    mu = np.empty(columns.n_genes)
    sigma2 = np.empty(columns.n_genes)
    _initial_moments(*columns.arrays, depth, *per_depth, sums, mu, sigma2)
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = mu * mu / sigma2

    iteration, delta = 0, np.inf
    while delta > eps and iteration <= n_iter:
        theta_previous = theta.copy()
        theta_median = _positive_median(theta, columns.n_genes)
        _irls_update(*columns.arrays, depth, *per_depth, theta_median, mu, sigma2)
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


@dataclass(frozen=True)
class _Factors:
    """One gene block's factors of the four Gram matrices, genes x cells (A, C) or genes x depths (B, D)."""

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    d: np.ndarray


def _factors(
    columns: _Columns, depth: np.ndarray, groups: _DepthGroups, moments: Moments, start: int, stop: int
) -> _Factors:
    """``A = s R / w``, ``C = s R / S`` over cells and ``B = s^2 / w``, ``D = s^2 / S`` over depths."""
    a = np.empty((stop - start, len(depth)))
    c = np.empty_like(a)
    _fill_residuals(
        *columns.arrays,
        depth,
        groups.of_cell,
        groups.depth,
        start,
        moments.mu,
        moments.sigma2,
        moments.theta_median,
        a,
        c,
    )
    mu, sigma2 = moments.mu[start:stop], moments.sigma2[start:stop]
    m = np.outer(groups.depth, mu)
    # sum_i s_i^4 / (w_ij w_ik) = sum over depths of n_cells s^4 / (w_j w_k)
    scale = (np.sqrt(groups.n_cells) * groups.depth_sq)[:, None]
    b = (scale / _mean_weights(m, groups.depth_sq, mu, moments.theta_median)).T
    with np.errstate(divide="ignore", invalid="ignore"):
        d = (scale / (m + np.outer(groups.depth_sq, sigma2))).T
    return _Factors(a=a, b=b, c=c, d=d)


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
    depth = np.asarray(depth, dtype=np.float64)
    groups = _DepthGroups(depth)
    n_square = 3 if keep_null_precision else 2
    genes_per_block = block_size(n_cells, n_genes, max_memory_bytes, n_square, groups.n_depths)
    columns = _Columns(counts)  # one CSC copy of CSR input, shared by both steps
    moments = fit_moments(columns, depth, n_iter=n_iter, eps=eps)
    valid = np.isfinite(moments.sigma2) & (moments.sigma2 > 0)
    sigma = np.sqrt(np.where(valid, moments.sigma2, 1.0))

    correlation = np.empty((n_genes, n_genes))
    statistic = np.empty((n_genes, n_genes))
    precision_sqrt = np.empty((n_genes, n_genes)) if keep_null_precision else None
    starts = list(range(0, n_genes, genes_per_block))
    with np.errstate(divide="ignore", invalid="ignore"):
        for index, start_a in enumerate(starts):
            stop_a = min(start_a + genes_per_block, n_genes)
            left = _factors(columns, depth, groups, moments, start_a, stop_a)
            for start_b in starts[index:]:
                stop_b = min(start_b + genes_per_block, n_genes)
                right = (
                    left if start_b == start_a else _factors(columns, depth, groups, moments, start_b, stop_b)
                )
                block_a, block_b = slice(start_a, stop_a), slice(start_b, stop_b)
                # sigma_jk / (sigma_j sigma_k): one rounding of sigma_j * sigma_k keeps it symmetric
                correlation[block_a, block_b] = (
                    _gram(left.a, right.a) / _gram(left.b, right.b) / np.outer(sigma[block_a], sigma[block_b])
                )
                root = np.sqrt(_gram(left.d, right.d))
                statistic[block_a, block_b] = _gram(left.c, right.c) / root
                if precision_sqrt is not None:
                    precision_sqrt[block_a, block_b] = root
                for square in (correlation, statistic, precision_sqrt):
                    if square is None:
                        continue
                    if start_b == start_a:
                        _mirror_upper(square[block_a, block_a])
                    else:
                        square[block_b, block_a] = square[block_a, block_b].T
                del right
    statistic[~np.isfinite(statistic)] = np.nan

    n_high, n_low = _post_process(correlation, valid)
    return CoexpressionFit(
        correlation=correlation,
        statistic=statistic,
        moments=moments,
        null_precision_sqrt=precision_sqrt,
        n_negative_variance=int((~valid).sum()),
        n_clipped_high=n_high,
        n_clipped_low=n_low,
    )


def _gram(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``left right^T`` over rows of genes; numpy computes a diagonal block (``right is left``) with
    syrk, at half the cost."""
    return left @ right.T


def _mirror_upper(block: np.ndarray) -> None:
    """Copy the strict upper triangle of a square block onto its lower one, in place (exact symmetry)."""
    for row in range(1, len(block)):
        block[row, :row] = block[:row, row]


def _post_process(correlation: np.ndarray, valid: np.ndarray) -> tuple[int, int]:
    """CS-CORE's post-processing in place: genes without a positive variance 0, diagonal 1, clip."""
    correlation[~valid, :] = 0.0
    correlation[:, ~valid] = 0.0
    np.fill_diagonal(correlation, 1.0)
    # symmetric with 1 on the diagonal: each out-of-range pair is counted twice
    n_high = int(np.count_nonzero(correlation > 1)) // 2
    n_low = int(np.count_nonzero(correlation < -1)) // 2
    np.clip(correlation, -1.0, 1.0, out=correlation)
    return n_high, n_low
