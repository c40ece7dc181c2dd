"""Compiled per-chunk kernels of the tokenizers (numba), one pass over a CSR row block each.

Every kernel works row by row and depends only on that row (and, for randomised choices, on a
per-cell seed), so outputs do not depend on how rows are split into chunks or over workers.

Sorting: rows are short (hundreds to a few thousand entries) and sorted once each, so a stable
MSD radix sort on 64-bit keys (bucketing on the highest bits that differ, insertion sort on small
buckets) replaces a comparison sort. Positive float64 values compare like their bit patterns
read as unsigned integers, so a descending sort by value is an ascending sort by ``~bits``;
stability keeps equal keys in input order, which is the tie-break the tokenizers document.
"""

from __future__ import annotations

import numba
import numpy as np

_SMALL = 24  # segments up to this size are insertion-sorted
_MAX_BITS = 12  # at most 4096 buckets per radix pass
_SIGN_BIT = np.uint64(1) << np.uint64(63)

# Flags a kernel returns about its input (first offending row and value are returned too).
NEGATIVE = 1
NON_INTEGER = 2
NON_FINITE = 4
ZERO_TOTAL = 8


@numba.njit(cache=True, nogil=True)
def _insertion_sort(keys, payload, lo, hi):
    for i in range(lo + 1, hi):
        key = keys[i]
        item = payload[i]
        j = i - 1
        while j >= lo and keys[j] > key:
            keys[j + 1] = keys[j]
            payload[j + 1] = payload[j]
            j -= 1
        keys[j + 1] = key
        payload[j + 1] = item


@numba.njit(cache=True, nogil=True)
def _highest_bit(value):
    position = 0
    while value > np.uint64(1):
        value >>= np.uint64(1)
        position += 1
    return position


@numba.njit(cache=True, nogil=True)
def stable_sort(keys, payload, n, key_buffer, payload_buffer, stack, counts):
    """Sort ``keys[:n]`` ascending, moving ``payload`` along; equal keys keep their input order.

    Buffers come from :func:`workspace`.
    """
    if n < 2:
        return
    stack[0, 0] = 0
    stack[0, 1] = n
    top = 1
    while top > 0:
        top -= 1
        lo = stack[top, 0]
        hi = stack[top, 1]
        size = hi - lo
        if size <= _SMALL:
            _insertion_sort(keys, payload, lo, hi)
            continue
        smallest = keys[lo]
        largest = keys[lo]
        for i in range(lo + 1, hi):
            if keys[i] < smallest:
                smallest = keys[i]
            elif keys[i] > largest:
                largest = keys[i]
        if smallest == largest:
            continue  # all equal: already in (stable) order
        # Split [smallest, largest] into equal ranges of keys: for float bit patterns that is an
        # even split in log scale, so rows spanning several binades still land ~1 per bucket.
        n_bits = 4
        while n_bits < _MAX_BITS and (1 << n_bits) < 2 * size:
            n_bits += 1
        shift = _highest_bit(largest - smallest) - n_bits + 1
        if shift < 0:
            shift = 0
        ushift = np.uint64(shift)
        n_buckets = int((largest - smallest) >> ushift) + 1
        for b in range(n_buckets + 1):
            counts[b] = 0
        for i in range(lo, hi):
            counts[((keys[i] - smallest) >> ushift) + np.uint64(1)] += 1
        for b in range(n_buckets):
            counts[b + 1] += counts[b]
        for i in range(lo, hi):
            b = (keys[i] - smallest) >> ushift
            target = lo + counts[b]
            counts[b] += 1
            key_buffer[target] = keys[i]
            payload_buffer[target] = payload[i]
        for i in range(lo, hi):
            keys[i] = key_buffer[i]
            payload[i] = payload_buffer[i]
        if shift == 0:
            continue  # buckets hold equal keys
        # counts[b] is now the end of bucket b: sort small buckets now, push the large ones.
        start = lo
        for b in range(n_buckets):
            end = lo + counts[b]
            if end - start > _SMALL:
                stack[top, 0] = start
                stack[top, 1] = end
                top += 1
            elif end - start > 1:
                _insertion_sort(keys, payload, start, end)
            start = end


@numba.njit(cache=True, nogil=True)
def workspace(max_n):
    """Buffers for :func:`stable_sort` on up to ``max_n`` keys.

    Each radix level consumes at least 4 of the 64 key bits, so at most 16 levels of at most 4096
    pending buckets are ever on the stack.
    """
    size = max(max_n, 1)
    return (
        np.empty(size, dtype=np.uint64),
        np.empty(size, dtype=np.int64),
        np.empty((16 * 4096 + 2, 2), dtype=np.int64),
        np.zeros(4097, dtype=np.int64),
    )


@numba.njit(cache=True, nogil=True)
def _check_value(x, flags):
    if not np.isfinite(x):
        return flags | NON_FINITE
    if x < 0:
        flags |= NEGATIVE
    if x != np.floor(x):
        flags |= NON_INTEGER
    return flags


@numba.njit(cache=True, nogil=True)
def _splitmix64(state):
    z = state + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True, nogil=True)
def _uniform(seed, stream, i):
    """A uniform [0, 1) double from (cell seed, stream, position): counter-based, order-free."""
    h = _splitmix64(seed ^ _splitmix64(np.uint64(stream) * np.uint64(0x632BE59BD9B4E019) + np.uint64(i)))
    return (h >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(cache=True, nogil=True)
def rank_value_chunk(
    indptr,
    indices,
    data,
    n_counts,
    col_gene,
    gene_token,
    gene_median,
    max_genes,
    cls_id,
    eos_id,
    target_sum,
    check_counts,
):
    """Geneformer rank-value encoding of a CSR row block.

    ``col_gene[j]`` is the gene (index into ``gene_token``/``gene_median``) of column ``j`` or -1;
    columns sharing a gene are summed. ``n_counts[r]`` NaN means: use the row sum over all columns.
    Returns token ids (flat), tokens per row (specials included), genes per row before truncation,
    input flags, first flagged row and its value.
    """
    n_rows = indptr.shape[0] - 1
    n_special = (1 if cls_id >= 0 else 0) + (1 if eos_id >= 0 else 0)
    widest = 0
    total = 0
    for r in range(n_rows):
        width = indptr[r + 1] - indptr[r]
        widest = max(widest, width)
        total += min(width, max_genes) + n_special
    out = np.empty(total, dtype=np.int32)
    lengths = np.zeros(n_rows, dtype=np.int64)
    n_genes_row = np.zeros(n_rows, dtype=np.int64)
    n_genes = gene_token.shape[0]
    stamp = np.full(n_genes, -1, dtype=np.int64)
    slot = np.empty(n_genes, dtype=np.int64)
    summed = np.empty(max(widest, 1), dtype=np.float64)
    genes = np.empty(max(widest, 1), dtype=np.int64)
    scaled = np.empty(max(widest, 1), dtype=np.float64)
    scaled_bits = scaled.view(np.uint64)
    keys = np.empty(max(widest, 1), dtype=np.uint64)
    order = np.empty(max(widest, 1), dtype=np.int64)
    key_buffer, payload_buffer, stack, counts = workspace(widest)
    flags = 0
    bad_row = -1
    bad_value = 0.0
    cursor = 0
    for r in range(n_rows):
        total_count = n_counts[r]
        row_sum = 0.0
        m = 0
        for p in range(indptr[r], indptr[r + 1]):
            x = data[p]
            if check_counts:
                new_flags = _check_value(x, flags)
                if new_flags != flags:
                    if bad_row < 0:
                        bad_row = r
                        bad_value = x
                    flags = new_flags
            row_sum += x
            g = col_gene[indices[p]]
            if g < 0 or x == 0:
                continue
            if stamp[g] != r:
                stamp[g] = r
                slot[g] = m
                summed[m] = x
                genes[m] = g
                m += 1
            else:
                summed[slot[g]] += x
        if np.isnan(total_count):
            total_count = row_sum
        k = 0
        for i in range(m):
            if summed[i] == 0:
                continue
            if not total_count > 0:
                if bad_row < 0:
                    bad_row = r
                    bad_value = total_count
                flags |= ZERO_TOTAL
                break
            # Same operation order as Geneformer: x / n_counts * target_sum / median.
            scaled[k] = summed[i] / total_count * target_sum / gene_median[genes[i]]
            keys[k] = ~scaled_bits[k]
            order[k] = genes[i]
            k += 1
        stable_sort(keys, order, k, key_buffer, payload_buffer, stack, counts)
        kept = min(k, max_genes)
        start = cursor
        if cls_id >= 0:
            out[cursor] = cls_id
            cursor += 1
        for i in range(kept):
            out[cursor] = gene_token[order[i]]
            cursor += 1
        if eos_id >= 0:
            out[cursor] = eos_id
            cursor += 1
        lengths[r] = cursor - start
        n_genes_row[r] = k
    return out[:cursor], lengths, n_genes_row, flags, bad_row, bad_value


@numba.njit(cache=True, nogil=True)
def normalised_by_gene(indptr, indices, data, n_counts, col_gene, target_sum, check_counts):
    """(gene, x / n_counts * target_sum) for every expressed gene of every row (duplicates summed)."""
    n_rows = indptr.shape[0] - 1
    nnz = indptr[n_rows] - indptr[0]
    out_gene = np.empty(nnz, dtype=np.int64)
    out_value = np.empty(nnz, dtype=np.float64)
    n_genes = 0
    for j in range(col_gene.shape[0]):
        n_genes = max(n_genes, col_gene[j] + 1)
    stamp = np.full(max(n_genes, 1), -1, dtype=np.int64)
    slot = np.empty(max(n_genes, 1), dtype=np.int64)
    flags = 0
    bad_row = -1
    bad_value = 0.0
    cursor = 0
    for r in range(n_rows):
        total_count = n_counts[r]
        row_sum = 0.0
        start = cursor
        for p in range(indptr[r], indptr[r + 1]):
            x = data[p]
            if check_counts:
                new_flags = _check_value(x, flags)
                if new_flags != flags:
                    if bad_row < 0:
                        bad_row = r
                        bad_value = x
                    flags = new_flags
            row_sum += x
            g = col_gene[indices[p]]
            if g < 0 or x == 0:
                continue
            if stamp[g] != r:
                stamp[g] = r
                slot[g] = cursor
                out_gene[cursor] = g
                out_value[cursor] = x
                cursor += 1
            else:
                out_value[slot[g]] += x
        if np.isnan(total_count):
            total_count = row_sum
        for i in range(start, cursor):
            if not total_count > 0:
                flags |= ZERO_TOTAL
                if bad_row < 0:
                    bad_row = r
                    bad_value = total_count
                break
            out_value[i] = out_value[i] / total_count * target_sum
    return out_gene[:cursor], out_value[:cursor], flags, bad_row, bad_value


@numba.njit(cache=True, nogil=True)
def expression_scaled_chunk(indptr, indices, data, col_token, max_length):
    """Expressed genes of each row as (token, value) in column order, keeping the ``max_length``
    largest values (ties: the earlier column) when a row has more."""
    n_rows = indptr.shape[0] - 1
    widest = 0
    total = 0
    for r in range(n_rows):
        width = indptr[r + 1] - indptr[r]
        widest = max(widest, width)
        total += min(width, max_length)
    out_ids = np.empty(total, dtype=np.int32)
    out_values = np.empty(total, dtype=np.float32)
    lengths = np.zeros(n_rows, dtype=np.int64)
    n_expressed = np.zeros(n_rows, dtype=np.int64)
    value = np.empty(max(widest, 1), dtype=np.float64)
    value_bits = value.view(np.uint64)
    token = np.empty(max(widest, 1), dtype=np.int64)
    keys = np.empty(max(widest, 1), dtype=np.uint64)
    order = np.empty(max(widest, 1), dtype=np.int64)
    keep = np.zeros(max(widest, 1), dtype=np.bool_)
    key_buffer, payload_buffer, stack, counts = workspace(widest)
    flags = 0
    bad_row = -1
    bad_value = 0.0
    cursor = 0
    for r in range(n_rows):
        m = 0
        for p in range(indptr[r], indptr[r + 1]):
            x = data[p]
            if not np.isfinite(x) or x < 0:
                flags |= NEGATIVE if np.isfinite(x) else NON_FINITE
                if bad_row < 0:
                    bad_row = r
                    bad_value = x
                continue
            t = col_token[indices[p]]
            if t < 0 or x == 0:
                continue
            value[m] = x
            token[m] = t
            m += 1
        start = cursor
        if m <= max_length:
            for i in range(m):
                out_ids[cursor] = token[i]
                out_values[cursor] = value[i]
                cursor += 1
        else:
            for i in range(m):
                keys[i] = ~value_bits[i]
                order[i] = i
                keep[i] = False
            stable_sort(keys, order, m, key_buffer, payload_buffer, stack, counts)
            for i in range(max_length):
                keep[order[i]] = True
            for i in range(m):
                if keep[i]:
                    out_ids[cursor] = token[i]
                    out_values[cursor] = value[i]
                    cursor += 1
        lengths[r] = cursor - start
        n_expressed[r] = m
    return out_ids[:cursor], out_values[:cursor], lengths, n_expressed, flags, bad_row, bad_value


@numba.njit(cache=True, nogil=True)
def binned_chunk(
    indptr, indices, data, col_token, seeds, quantiles, cls_id, max_length, spread_ties, random_truncation
):
    """scGPT value binning of a CSR row block: ``<cls>`` then (token, bin) of each expressed gene.

    Bin edges are ``np.quantile(nonzero, quantiles)`` (linear interpolation, computed as numpy
    does); a value's bin is ``np.digitize(x, edges)``; with ``spread_ties`` a value equal to
    several edges gets ``ceil(u * (right - left) + left)`` with ``right = np.digitize(x, edges,
    right=True)`` and ``u`` uniform from the cell's seed (scGPT's ``_digitize(side="both")``).
    Rows longer than ``max_length - 1`` keep a random subset (``random_truncation``, from the
    cell's seed) or the largest values; kept genes stay in column order.
    """
    n_rows = indptr.shape[0] - 1
    n_edges = quantiles.shape[0]
    keep_genes = max_length - 1
    widest = 0
    total = 0
    for r in range(n_rows):
        width = indptr[r + 1] - indptr[r]
        widest = max(widest, width)
        total += min(width, keep_genes) + 1
    out_ids = np.empty(total, dtype=np.int32)
    out_values = np.empty(total, dtype=np.float32)
    lengths = np.zeros(n_rows, dtype=np.int64)
    n_expressed = np.zeros(n_rows, dtype=np.int64)
    value = np.empty(max(widest, 1), dtype=np.float64)
    value_bits = value.view(np.uint64)
    token = np.empty(max(widest, 1), dtype=np.int64)
    digit = np.empty(max(widest, 1), dtype=np.int64)
    ordered = np.empty(max(widest, 1), dtype=np.float64)
    keys = np.empty(max(widest, 1), dtype=np.uint64)
    order = np.empty(max(widest, 1), dtype=np.int64)
    keep = np.zeros(max(widest, 1), dtype=np.bool_)
    edges = np.empty(n_edges, dtype=np.float64)
    key_buffer, payload_buffer, stack, counts = workspace(widest)
    flags = 0
    bad_row = -1
    bad_value = 0.0
    cursor = 0
    for r in range(n_rows):
        m = 0
        for p in range(indptr[r], indptr[r + 1]):
            x = data[p]
            if not np.isfinite(x) or x < 0:
                flags |= NEGATIVE if np.isfinite(x) else NON_FINITE
                if bad_row < 0:
                    bad_row = r
                    bad_value = x
                continue
            t = col_token[indices[p]]
            if t < 0 or x == 0:
                continue
            value[m] = x
            token[m] = t
            m += 1
        if m > 0:
            # Sorted copy of the row's values (positive floats sort like their bits).
            for i in range(m):
                keys[i] = value_bits[i]
                order[i] = i
            stable_sort(keys, order, m, key_buffer, payload_buffer, stack, counts)
            for i in range(m):
                ordered[i] = value[order[i]]
            # numpy's "linear" quantile: virtual index (n - 1) * q, floor, lerp as numpy._lerp.
            for j in range(n_edges):
                virtual = (m - 1) * quantiles[j]
                previous = np.floor(virtual)
                if virtual >= m - 1:
                    low_index = m - 1
                    high_index = m - 1
                    previous = -1.0
                else:
                    low_index = int(previous)
                    high_index = low_index + 1
                gamma = virtual - previous
                a = ordered[low_index]
                b = ordered[high_index]
                difference = b - a
                if gamma >= 0.5:
                    edges[j] = b - difference * (1 - gamma)
                else:
                    edges[j] = a + difference * gamma
            # Values in ascending order meet the edges in ascending order: one merge pass.
            left = 0  # edges <= x: np.digitize(x, edges)
            right = 0  # edges < x: np.digitize(x, edges, right=True)
            for rank in range(m):
                x = ordered[rank]
                while left < n_edges and edges[left] <= x:
                    left += 1
                while right < n_edges and edges[right] < x:
                    right += 1
                i = order[rank]
                if spread_ties and right != left:
                    u = _uniform(np.uint64(seeds[r]), 1, i)
                    digit[i] = int(np.ceil(u * (right - left) + left))
                else:
                    digit[i] = left
        start = cursor
        out_ids[cursor] = cls_id
        out_values[cursor] = 0.0
        cursor += 1
        if m <= keep_genes:
            for i in range(m):
                out_ids[cursor] = token[i]
                out_values[cursor] = digit[i]
                cursor += 1
        else:
            for i in range(m):
                if random_truncation:
                    keys[i] = _splitmix64(
                        np.uint64(seeds[r]) ^ _splitmix64(np.uint64(0x5CA1AB1E) + np.uint64(i))
                    )
                else:
                    keys[i] = ~value_bits[i]
                order[i] = i
                keep[i] = False
            stable_sort(keys, order, m, key_buffer, payload_buffer, stack, counts)
            for i in range(keep_genes):
                keep[order[i]] = True
            for i in range(m):
                if keep[i]:
                    out_ids[cursor] = token[i]
                    out_values[cursor] = digit[i]
                    cursor += 1
        lengths[r] = cursor - start
        n_expressed[r] = m
    return out_ids[:cursor], out_values[:cursor], lengths, n_expressed, flags, bad_row, bad_value
