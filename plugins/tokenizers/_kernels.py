"""Compiled per-chunk kernels of the tokenizers (numba), one pass over a CSR row block each.

Every kernel works row by row and depends only on that row (and, for randomised choices, on a
per-cell seed), so outputs do not depend on how rows are split into chunks or over workers.

Sorting: rows are short (hundreds to a few thousand entries) and sorted once each, so a stable
radix sort on 64-bit keys (two 8-bit passes on the 16 highest bits in which a row's keys differ,
refined on the runs that share them) replaces a comparison sort. Positive float64 values compare like their bit patterns
read as unsigned integers, so a descending sort by value is an ascending sort by ``~bits``;
stability keeps equal keys in input order, which is the tie-break the tokenizers document.
"""

from __future__ import annotations

import numba
import numpy as np

_SMALL = 32  # segments up to this size are insertion-sorted

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
def _scatter(
    source_keys, source_payload, target_keys, target_payload, lo, hi, smallest, shift, digit, counts
):
    """One stable counting pass of :func:`stable_sort` on byte ``digit`` (0: low, 1: high)."""
    base = 256 * digit
    total = lo
    for b in range(base, base + 256):
        count = counts[b]
        counts[b] = total
        total += count
    byte_shift = shift + np.uint64(8 * digit)
    for i in range(lo, hi):
        b = base + (((source_keys[i] - smallest) >> byte_shift) & np.uint64(255))
        j = counts[b]
        counts[b] = j + 1
        target_keys[j] = source_keys[i]
        target_payload[j] = source_payload[i]


@numba.njit(cache=True, nogil=True)
def stable_sort(keys, payload, n, key_buffer, payload_buffer, stack, counts):
    """Sort ``keys[:n]`` ascending, moving ``payload`` along; equal keys keep their input order.

    A segment's keys are sorted on the 16 bits below the highest bit in which they differ
    (``key - smallest``, two stable 8-bit counting passes through the buffers); runs that share
    those 16 bits and differ further are pushed and sorted the same way on their own range, and
    segments of up to ``_SMALL`` keys are insertion-sorted. Every step is stable, so the whole
    sort is. Buffers come from :func:`workspace`.
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
        if hi - lo <= _SMALL:
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
        shift = np.uint64(max(_highest_bit(largest - smallest) - 15, 0))
        for b in range(512):
            counts[b] = 0
        for i in range(lo, hi):
            digits = (keys[i] - smallest) >> shift  # < 2 ** 16
            counts[digits & np.uint64(255)] += 1
            counts[256 + (digits >> np.uint64(8))] += 1
        first = (keys[lo] - smallest) >> shift
        in_buffer = False
        if counts[first & np.uint64(255)] != hi - lo:  # the low bytes differ
            _scatter(keys, payload, key_buffer, payload_buffer, lo, hi, smallest, shift, 0, counts)
            in_buffer = True
        if counts[256 + (first >> np.uint64(8))] != hi - lo:  # the high bytes differ
            if in_buffer:
                _scatter(key_buffer, payload_buffer, keys, payload, lo, hi, smallest, shift, 1, counts)
                in_buffer = False
            else:
                _scatter(keys, payload, key_buffer, payload_buffer, lo, hi, smallest, shift, 1, counts)
                in_buffer = True
        if in_buffer:
            for i in range(lo, hi):
                keys[i] = key_buffer[i]
                payload[i] = payload_buffer[i]
        if shift == 0:
            continue  # those 16 bits were all the difference
        # Runs sharing the 16 bits: sorted on their remaining bits, short ones now, others later.
        start = lo
        prefix = (keys[lo] - smallest) >> shift
        for i in range(lo + 1, hi + 1):
            current = prefix
            if i < hi:
                current = (keys[i] - smallest) >> shift
                if current == prefix:
                    continue
            if i - start > _SMALL:
                stack[top, 0] = start
                stack[top, 1] = i
                top += 1
            elif i - start > 1:
                _insertion_sort(keys, payload, start, i)
            start = i
            prefix = current


@numba.njit(cache=True, nogil=True)
def workspace(max_n):
    """Buffers for :func:`stable_sort` on up to ``max_n`` keys.

    Each level of refinement resolves 16 of the 64 key bits and pushes only runs of more than
    ``_SMALL`` keys, so at most ``4 * max_n / _SMALL`` segments are ever on the stack.
    """
    size = max(max_n, 1)
    return (
        np.empty(size, dtype=np.uint64),
        np.empty(size, dtype=np.int64),
        np.empty((4 * (size // _SMALL) + 8, 2), dtype=np.int64),
        np.zeros(512, dtype=np.int64),
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
def _scaled(x, recip, recip_median, target_sum, single):
    """Geneformer's median-scaled value of a count ``x`` in a cell whose total has reciprocal ``recip``.

    The operations of Geneformer's ``tokenize_anndata`` on a sparse matrix (scipy divides a sparse
    matrix by a dense array by multiplying with its reciprocal): ``x * (1 / n) * target_sum *
    (1 / median)``; ``single``: the first two products in float32 (float32 counts and ``n_counts``).
    ``recip_median`` 0: normalisation only (fitting medians).
    """
    if single:
        unscaled = np.float64(np.float32(x) * np.float32(recip) * np.float32(target_sum))
    else:
        unscaled = x * recip * target_sum
    if recip_median == 0.0:
        return unscaled
    return unscaled * recip_median


@numba.njit(cache=True, nogil=True)
def _flag(flagged, bad_value, flags, row, value):
    """Record input flags; the first flagged row and its value are kept."""
    if flagged[1] < 0:
        flagged[1] = row
        bad_value[0] = value
    flagged[0] = flags


@numba.njit(cache=True, nogil=True)
def _row_entries(
    indptr,
    indices,
    data,
    r,
    col_slot,
    n_single,
    summed,
    touched,
    stamp,
    values,
    slots,
    check_counts,
    flagged,
    bad_value,
):
    """Expressed slots of row ``r`` into ``values``/``slots``, in slot order; returns (count, row sum).

    Slots below ``n_single`` hold one column each and arrive in column order (= slot order);
    the others sum several columns and are appended after them, in slot order. ``flagged`` holds
    (input flags, first flagged row) and ``bad_value`` that row's value; ``summed``, ``touched``
    and ``stamp`` are per-chunk scratch for the summed slots.
    """
    row_sum = 0.0
    m = 0
    n_touched = 0
    for p in range(indptr[r], indptr[r + 1]):
        x = data[p]
        # One comparison chain for the common case (a finite non-negative integer); NaN fails it.
        if check_counts and not (x >= 0 and x < np.inf and x == np.floor(x)):
            flags = _check_value(x, flagged[0])
            if flags != flagged[0]:
                _flag(flagged, bad_value, flags, r, x)
        row_sum += x
        s = col_slot[indices[p]]
        if s < 0 or x == 0:
            continue
        if s < n_single:
            values[m] = x
            slots[m] = s
            m += 1
            continue
        k = s - n_single
        if stamp[k] != r:
            stamp[k] = r
            summed[k] = x
            touched[n_touched] = k
            n_touched += 1
        else:
            summed[k] += x
    # Summed slots in slot order (there are few: insertion sort).
    for i in range(1, n_touched):
        key = touched[i]
        j = i - 1
        while j >= 0 and touched[j] > key:
            touched[j + 1] = touched[j]
            j -= 1
        touched[j + 1] = key
    for i in range(n_touched):
        k = touched[i]
        if summed[k] != 0:
            values[m] = summed[k]
            slots[m] = n_single + k
            m += 1
    return m, row_sum


@numba.njit(cache=True, nogil=True)
def rank_value_chunk(
    indptr,
    indices,
    data,
    n_counts,
    recip_counts,
    col_slot,
    n_single,
    slot_token,
    slot_recip_median,
    max_genes,
    cls_id,
    eos_id,
    target_sum,
    single,
    check_counts,
):
    """Geneformer rank-value encoding of a CSR row block.

    ``col_slot[j]`` is the slot of column ``j`` (-1: not tokenised); slots below ``n_single`` hold
    one column, later ones sum all their columns (``rank_value`` builds them). Each slot has a
    token and its median's reciprocal; two slots may share a token. ``n_counts[r]`` (with
    ``recip_counts[r]``, computed as Geneformer does) is the cell's total; NaN means the row sum
    over all columns. Values are sorted descending with a stable sort, so ties keep slot order.
    Returns token ids (flat), tokens per row (specials included), slots per row before truncation,
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
    n_summed = max(slot_token.shape[0] - n_single, 1)
    summed = np.empty(n_summed, dtype=np.float64)
    touched = np.empty(n_summed, dtype=np.int64)
    stamp = np.full(n_summed, -1, dtype=np.int64)
    values = np.empty(max(widest, 1), dtype=np.float64)
    slots = np.empty(max(widest, 1), dtype=np.int64)
    scaled = np.empty(max(widest, 1), dtype=np.float64)
    scaled_bits = scaled.view(np.uint64)
    keys = np.empty(max(widest, 1), dtype=np.uint64)
    key_buffer, payload_buffer, stack, counts = workspace(widest)
    flagged = np.array([0, -1], dtype=np.int64)  # input flags, first flagged row
    bad_value = np.zeros(1, dtype=np.float64)
    cursor = 0
    for r in range(n_rows):
        m, row_sum = _row_entries(
            indptr,
            indices,
            data,
            r,
            col_slot,
            n_single,
            summed,
            touched,
            stamp,
            values,
            slots,
            check_counts,
            flagged,
            bad_value,
        )
        total_count = n_counts[r]
        recip = recip_counts[r]
        if np.isnan(total_count):
            total_count = row_sum
            recip = 1.0 / row_sum
        if m > 0 and not total_count > 0:
            _flag(flagged, bad_value, flagged[0] | ZERO_TOTAL, r, total_count)
            m = 0
        for i in range(m):
            scaled[i] = _scaled(values[i], recip, slot_recip_median[slots[i]], target_sum, single)
            keys[i] = ~scaled_bits[i]
        stable_sort(keys, slots, m, key_buffer, payload_buffer, stack, counts)
        kept = min(m, max_genes)
        start = cursor
        if cls_id >= 0:
            out[cursor] = cls_id
            cursor += 1
        for i in range(kept):
            out[cursor] = slot_token[slots[i]]
            cursor += 1
        if eos_id >= 0:
            out[cursor] = eos_id
            cursor += 1
        lengths[r] = cursor - start
        n_genes_row[r] = m
    return out[:cursor], lengths, n_genes_row, flagged[0], flagged[1], bad_value[0]


@numba.njit(cache=True, nogil=True)
def normalised_by_slot(
    indptr,
    indices,
    data,
    n_counts,
    recip_counts,
    col_slot,
    n_single,
    n_slots,
    target_sum,
    single,
    check_counts,
):
    """(slot, normalised count ``x / n_counts * target_sum``) for every expressed slot of every row,
    with the arithmetic of :func:`rank_value_chunk` (for fitting medians)."""
    n_rows = indptr.shape[0] - 1
    nnz = indptr[n_rows] - indptr[0]
    out_slot = np.empty(nnz, dtype=np.int64)
    out_value = np.empty(nnz, dtype=np.float64)
    widest = 0
    for r in range(n_rows):
        widest = max(widest, indptr[r + 1] - indptr[r])
    n_summed = max(n_slots - n_single, 1)
    summed = np.empty(n_summed, dtype=np.float64)
    touched = np.empty(n_summed, dtype=np.int64)
    stamp = np.full(n_summed, -1, dtype=np.int64)
    values = np.empty(max(widest, 1), dtype=np.float64)
    slots = np.empty(max(widest, 1), dtype=np.int64)
    flagged = np.array([0, -1], dtype=np.int64)
    bad_value = np.zeros(1, dtype=np.float64)
    cursor = 0
    for r in range(n_rows):
        m, row_sum = _row_entries(
            indptr,
            indices,
            data,
            r,
            col_slot,
            n_single,
            summed,
            touched,
            stamp,
            values,
            slots,
            check_counts,
            flagged,
            bad_value,
        )
        total_count = n_counts[r]
        recip = recip_counts[r]
        if np.isnan(total_count):
            total_count = row_sum
            recip = 1.0 / row_sum
        if m > 0 and not total_count > 0:
            _flag(flagged, bad_value, flagged[0] | ZERO_TOTAL, r, total_count)
            continue
        for i in range(m):
            out_slot[cursor] = slots[i]
            out_value[cursor] = _scaled(values[i], recip, 0.0, target_sum, single)
            cursor += 1
    return out_slot[:cursor], out_value[:cursor], flagged[0], flagged[1], bad_value[0]


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
