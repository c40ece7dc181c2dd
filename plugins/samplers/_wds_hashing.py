"""0-bit ICWS hashing of cells into a RACE sketch: the numeric core of the ``wds`` sampler.

Private module (imports numba): the component module imports it inside ``sample`` so that listing
plugins stays light.

Hash ``r`` of a non-negative vector ``x`` (Ioffe, ICDM 2010; 0-bit variant of Li, KDD 2015), with
per-gene draws ``r_g ~ Gamma(2, 1)``, ``c_g ~ Gamma(2, 1)``, ``beta_g ~ U(0, 1)`` fixed per hash::

    t_g   = floor(ln x_g / r_g + beta_g)
    ln a_g = ln c_g - r_g (t_g - beta_g) - r_g
    h_r(x) = argmin_g ln a_g  over the non-zero genes of x

``ln a_g = d_g - r_g t_g`` with ``d_g = ln c_g + r_g beta_g - r_g`` precomputed, so a (gene, hash)
step is a multiply-add, a floor, a multiply-subtract and a compare. The gene index is then mapped to
``[0, n_buckets)`` with a universal hash ``((a_r g + b_r) mod p) mod B`` per row when ``B`` is below
the number of genes (Carter & Wegman 1979), and counted into row ``r`` of the ``R x B`` sketch
(RACE, Coleman & Shrivastava, WWW 2020).

Sharpened kernel (``kernel_power`` p > 1): each sketch row takes ``p`` independent hashes and its
bucket is a universal hash of the tuple of their gene indices,
``((sum_k a_rk g_k + b_r) mod P) mod B`` (Carter & Wegman's polynomial family over tuples). Two
cells share the tuple with probability ``J^p`` (the hashes are independent) and distinct tuples
share a bucket with probability ~``1/B``, so the sketch estimates ``sum_y J(x, y)^p + n/B``.

Speed: the tables are stored gene-major (``(n_genes, R)``). A group of cells (a few hundred, so
that their running minima, 8 bytes per cell and hash, stay in a core's cache) is counting-sorted to
gene-major order, and each gene's table row is then read once per group and applied to every cell
of the group that expresses the gene, the loop over the R hashes running in SIMD lanes. Groups run
in parallel threads (numba ``prange``). Everything is float32 with IEEE semantics (no fast-math),
so results do not depend on chunking, threading or the machine's vector width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp

#: Mersenne prime 2^31 - 1 for the universal hash of gene indices into buckets.
UNIVERSAL_PRIME = np.int64(2**31 - 1)


@dataclass
class HashTables:
    """The random draws of ``R`` 0-bit ICWS hashes over ``n_genes`` genes, gene-major.

    All four tables are ``(n_genes, n_hashes)`` float32: ``inv_r = 1 / r``, ``beta``, ``r`` and
    ``d = ln c + r beta - r``. ``bucket_a``/``bucket_b`` are the per-row universal-hash
    coefficients (unused when ``n_buckets >= n_genes``, where the gene index is the bucket).
    """

    inv_r: np.ndarray
    beta: np.ndarray
    r: np.ndarray
    d: np.ndarray
    bucket_a: np.ndarray
    bucket_b: np.ndarray
    n_buckets: int

    @property
    def n_genes(self) -> int:
        return int(self.inv_r.shape[0])

    @property
    def n_hashes(self) -> int:
        return int(self.inv_r.shape[1])

    @property
    def rehash(self) -> bool:
        return self.n_buckets < self.n_genes

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.inv_r, self.beta, self.r, self.d))

    @classmethod
    def draw(cls, n_genes: int, n_hashes: int, n_buckets: int, rng: np.random.Generator) -> HashTables:
        """Draw the tables hash by hash (so hash ``r`` does not depend on ``R``), store gene-major."""
        inv_r = np.empty((n_genes, n_hashes), dtype=np.float32)
        beta = np.empty_like(inv_r)
        r_table = np.empty_like(inv_r)
        d = np.empty_like(inv_r)
        for j in range(n_hashes):
            r = rng.gamma(2.0, 1.0, n_genes)
            c = rng.gamma(2.0, 1.0, n_genes)
            b = rng.uniform(0.0, 1.0, n_genes)
            r32 = r.astype(np.float32)
            b32 = b.astype(np.float32)
            # The stored (float32) r and beta are the ones the kernel uses; d is derived from them.
            r64, b64 = r32.astype(np.float64), b32.astype(np.float64)
            inv_r[:, j] = (1.0 / r64).astype(np.float32)
            beta[:, j] = b32
            r_table[:, j] = r32
            d[:, j] = (np.log(c) + r64 * b64 - r64).astype(np.float32)
        bucket_a = rng.integers(1, UNIVERSAL_PRIME, n_hashes, dtype=np.int64)
        bucket_b = rng.integers(0, UNIVERSAL_PRIME, n_hashes, dtype=np.int64)
        return cls(inv_r, beta, r_table, d, bucket_a, bucket_b, int(n_buckets))

    def buckets_of_genes(self, genes: np.ndarray) -> np.ndarray:
        """Map ``(n_cells, R)`` min-hash gene indices to ``[0, n_buckets)``, one universal hash per row."""
        if not self.rehash:
            return genes.astype(np.int32, copy=False)
        mixed = (genes.astype(np.int64) * self.bucket_a[None, :] + self.bucket_b[None, :]) % UNIVERSAL_PRIME
        return (mixed % self.n_buckets).astype(np.int32)


@numba.njit(parallel=True, cache=True, nogil=True)
def _minhash_csr(
    indptr, indices, log_values, n_genes, inv_r, beta, r, d, group, out
):  # pragma: no cover - jitted
    n_cells = indptr.shape[0] - 1
    n_hashes = out.shape[1]
    n_groups = (n_cells + group - 1) // group
    for s in numba.prange(n_groups):
        first = s * group
        stop = min(n_cells, first + group)
        n_local = stop - first
        # Counting sort of the group's non-zeros by gene: gene-major order, genes ascending.
        starts = np.zeros(n_genes + 1, dtype=np.int64)
        for p in range(indptr[first], indptr[stop]):
            starts[indices[p] + 1] += 1
        for g in range(n_genes):
            starts[g + 1] += starts[g]
        fill = starts[:-1].copy()
        n_nonzero = indptr[stop] - indptr[first]
        local_cell = np.empty(n_nonzero, dtype=np.int64)
        local_log = np.empty(n_nonzero, dtype=np.float32)
        for c in range(first, stop):
            for p in range(indptr[c], indptr[c + 1]):
                q = fill[indices[p]]
                local_cell[q] = c - first
                local_log[q] = log_values[p]
                fill[indices[p]] = q + 1
        # Flat buffers indexed by offset: no per-non-zero array views (and their reference counting).
        best = np.full(n_local * n_hashes, np.inf, dtype=np.float32)
        arg = np.zeros(n_local * n_hashes, dtype=np.int32)
        width = np.uint64(n_hashes)
        for g in range(n_genes):
            if starts[g] == starts[g + 1]:
                continue
            # Unsigned offsets: no negative-index wrap-around checks, so the inner loop vectorises.
            row = np.uint64(g) * width
            for q in range(starts[g], starts[g + 1]):
                lx = local_log[q]
                cell = np.uint64(local_cell[q]) * width
                for j in range(width):
                    t = np.floor(lx * inv_r[row + j] + beta[row + j])
                    value = d[row + j] - r[row + j] * t
                    current = best[cell + j]
                    smaller = value < current
                    best[cell + j] = value if smaller else current
                    arg[cell + j] = g if smaller else arg[cell + j]
        out[first:stop] = arg.reshape(n_local, n_hashes)


@numba.njit(cache=True, nogil=True)
def _count_into_sketch(sketch, buckets):  # pragma: no cover - jitted
    n_cells, n_hashes = buckets.shape
    for c in range(n_cells):
        for j in range(n_hashes):
            sketch[j, buckets[c, j]] += 1


@numba.njit(cache=True, nogil=True)
def _query_sketch(sketch, buckets, out):  # pragma: no cover - jitted
    n_cells, n_hashes = buckets.shape
    for c in range(n_cells):
        total = 0
        for j in range(n_hashes):
            total += sketch[j, buckets[c, j]]
        out[c] = total / n_hashes


def cells_per_group(n_hashes: int) -> int:
    """Cells hashed together by one thread: their running minima (8 bytes per cell and hash) fit in ~1 MiB of cache."""
    return int(max(16, min(1024, (1 << 20) // (8 * n_hashes))))


def minhash_genes(chunk: sp.csr_matrix, tables: HashTables, group: int | None = None) -> np.ndarray:
    """The 0-bit ICWS gene index of every cell of a CSR chunk under every hash: ``(n_cells, R)`` int32.

    The chunk must be canonical (sorted, no duplicates), non-negative, without stored zeros and with
    at least one non-zero per row; the caller checks.
    """
    n_cells = chunk.shape[0]
    out = np.empty((n_cells, tables.n_hashes), dtype=np.int32)
    # ln of the float64 value, rounded once to float32: the same rounding for every cell.
    log_values = np.log(chunk.data.astype(np.float64)).astype(np.float32)
    _minhash_csr(
        chunk.indptr.astype(np.int64),
        chunk.indices.astype(np.int64),
        log_values,
        tables.n_genes,
        tables.inv_r.reshape(-1),
        tables.beta.reshape(-1),
        tables.r.reshape(-1),
        tables.d.reshape(-1),
        group or cells_per_group(tables.n_hashes),
        out,
    )
    return out


def hash_chunk(chunk: sp.csr_matrix, tables: HashTables) -> np.ndarray:
    """Sketch bucket of every cell of a chunk under every hash: ``(n_cells, R)`` int32."""
    return tables.buckets_of_genes(minhash_genes(chunk, tables))


def count_into_sketch(sketch: np.ndarray, buckets: np.ndarray) -> None:
    """Pass 1: ``sketch[r, bucket[c, r]] += 1`` for every cell ``c`` of the chunk and row ``r``."""
    _count_into_sketch(sketch, np.ascontiguousarray(buckets))


def query_sketch(sketch: np.ndarray, buckets: np.ndarray) -> np.ndarray:
    """Pass 2: ``(1/R) sum_r sketch[r, bucket[c, r]]``, the estimated Min-Max density of each cell."""
    out = np.empty(buckets.shape[0], dtype=np.float64)
    _query_sketch(sketch, np.ascontiguousarray(buckets), out)
    return out


@dataclass
class TupleBuckets:
    """Universal hash of ``p`` gene indices per sketch row into ``[0, n_buckets)`` (``kernel_power`` p).

    ``coefficients`` is ``(R, p)`` in ``[1, P)``, ``offsets`` ``(R,)`` in ``[0, P)``, with
    ``P = 2^31 - 1``; row ``r`` reads hashes ``r p, ..., r p + p - 1`` of the tables.
    """

    coefficients: np.ndarray
    offsets: np.ndarray
    n_buckets: int

    @property
    def kernel_power(self) -> int:
        return int(self.coefficients.shape[1])

    @classmethod
    def draw(cls, n_rows: int, kernel_power: int, n_buckets: int, rng: np.random.Generator) -> TupleBuckets:
        coefficients = rng.integers(1, UNIVERSAL_PRIME, (n_rows, kernel_power), dtype=np.int64)
        offsets = rng.integers(0, UNIVERSAL_PRIME, n_rows, dtype=np.int64)
        return cls(coefficients, offsets, int(n_buckets))

    def buckets(self, genes: np.ndarray) -> np.ndarray:
        """``(n_cells, R p)`` min-hash gene indices -> ``(n_cells, R)`` bucket of each row's tuple."""
        n_rows, power = self.coefficients.shape
        tuples = genes.astype(np.int64).reshape(genes.shape[0], n_rows, power)
        mixed = np.broadcast_to(self.offsets, (genes.shape[0], n_rows)).copy()
        for k in range(power):
            # Reduced after every term: a product of two values below 2^31 fits in int64, a sum of p may not.
            mixed = (mixed + tuples[:, :, k] * self.coefficients[None, :, k]) % UNIVERSAL_PRIME
        return (mixed % self.n_buckets).astype(np.int32)
