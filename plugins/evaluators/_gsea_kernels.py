"""numba kernels of the GSEA prerank (see ``_gsea``): ES walk, gseapy's permutation stream, random subsets.

Kept apart so importing ``_gsea`` (and listing plugins) does not import numba; compiled on first use
and cached on disk.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def walk_es(weights, positions, n_items):
    """ES of hits at sorted ``positions`` over ``weights`` (gseapy's fast_random_walk, same float order)."""
    k = positions.shape[0]
    ns = 0.0
    for i in range(k):
        ns += weights[positions[i]]
    if ns == 0.0:
        # All hits carry weight 0 (e.g. one hit at the last rank of n-1..0): gseapy divides by zero
        # and returns NaN; fall back to equal weights as fgsea does.
        uniform = True
        q2 = 1.0 / k
    else:
        uniform = False
        q2 = 1.0 / ns
    q1 = 1.0 / (n_items - float(k))
    res = 0.0
    cur = 0.0
    last = -1.0
    for i in range(k):
        pos = float(positions[i])
        cur -= q1 * (pos - last - 1.0)
        if abs(cur) > abs(res):
            res = cur
        if uniform:
            cur += q2
        else:
            cur += q2 * weights[positions[i]]
        if abs(cur) > abs(res):
            res = cur
        last = pos
    return res


@numba.njit(cache=True, nogil=True)
def rotl(x, k):
    return (x << np.uint64(k)) | (x >> np.uint64(64 - k))


@numba.njit(cache=True, nogil=True)
def next_u64(state):
    s0, s1, s2, s3 = state[0], state[1], state[2], state[3]
    result = rotl(s0 + s3, 23) + s0
    t = s1 << np.uint64(17)
    s2 ^= s0
    s3 ^= s1
    s1 ^= s2
    s0 ^= s3
    s2 ^= t
    s3 = rotl(s3, 45)
    state[0], state[1], state[2], state[3] = s0, s1, s2, s3
    return result


@numba.njit(cache=True, nogil=True)
def sample_below(state, bound):
    """rand 0.9 ``random_range(..bound)`` for u32 (biased Canon's method, default features)."""
    rng_range = np.uint64(bound)
    x = next_u64(state) >> np.uint64(32)
    product = x * rng_range
    result = product >> np.uint64(32)
    lo_order = product & np.uint64(0xFFFFFFFF)
    threshold = (np.uint64(1) << np.uint64(32)) - rng_range  # range.wrapping_neg() in u32
    if lo_order > threshold:
        x2 = next_u64(state) >> np.uint64(32)
        new_hi = (x2 * rng_range) >> np.uint64(32)
        if lo_order + new_hi > np.uint64(0xFFFFFFFF):
            result += np.uint64(1)
    return result


@numba.njit(cache=True, nogil=True)
def shuffle_bits(state, bits, n_items):
    """Apply rand 0.9 ``slice.shuffle`` (IncreasingUniform Fisher-Yates) to a packed bitset."""
    limit = np.uint64(0xFFFFFFFF)
    n = np.uint64(0)
    chunk = np.uint64(0)
    chunk_remaining = 1  # n == 0: the first index is 0 without drawing
    for i in range(n_items):
        next_n = n + np.uint64(1)
        if chunk_remaining == 0:
            product = next_n
            current = next_n + np.uint64(1)
            count = 1
            while True:
                candidate = product * current
                if candidate > limit:
                    break
                product = candidate
                current += np.uint64(1)
                count += 1
            chunk = sample_below(state, product)
            next_remaining = count - 1
        else:
            next_remaining = chunk_remaining - 1
        if next_remaining == 0:
            j = chunk
        else:
            j = chunk % next_n
            chunk = chunk // next_n
        chunk_remaining = next_remaining
        n = next_n
        # swap(i, j) on the membership bits
        jj = np.int64(j)
        wi, bi = i >> 6, np.uint64(i & 63)
        wj, bj = jj >> 6, np.uint64(jj & 63)
        vi = (bits[wi] >> bi) & np.uint64(1)
        vj = (bits[wj] >> bj) & np.uint64(1)
        if vi != vj:
            bits[wi] ^= np.uint64(1) << bi
            bits[wj] ^= np.uint64(1) << bj


@numba.njit(cache=True, nogil=True)
def popcount(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


@numba.njit(cache=True, nogil=True)
def bits_to_positions(bits, out, invert, n_items):
    """Sorted positions of the set bits (of the clear bits when ``invert``) below ``n_items``."""
    count = 0
    n_words = bits.shape[0]
    for w in range(n_words):
        word = ~bits[w] if invert else bits[w]
        if w == n_words - 1 and n_items % 64 != 0:
            word &= (np.uint64(1) << np.uint64(n_items % 64)) - np.uint64(1)
        while word != np.uint64(0):
            low = word & (~word + np.uint64(1))
            out[count] = w * 64 + np.int64(popcount(low - np.uint64(1)))
            count += 1
            word ^= low
    return count


@numba.njit(cache=True, nogil=True)
def random_subsets(n_items, k, n_subsets, state, weights, out_es, out_positions):
    """Uniform random k-subsets of range(n_items): distinct draws marked in a bitset, read back sorted.

    Fills ``out_es`` with the ES of each subset over ``weights`` (when ``weights`` is not empty)
    and ``out_positions`` (n_subsets x k, when not empty) with the subsets themselves.
    """
    complement = 2 * k > n_items
    m = n_items - k if complement else k
    bits = np.zeros((n_items + 63) // 64, dtype=np.uint64)
    drawn = np.empty(max(m, 1), dtype=np.int64)
    positions = np.empty(k, dtype=np.int64)
    n = np.uint64(n_items)
    for p in range(n_subsets):
        count = 0
        while count < m:
            r = np.int64(next_u64(state) % n)  # modulo bias < n / 2^64
            w, b = r >> 6, np.uint64(r & 63)
            if (bits[w] >> b) & np.uint64(1) == np.uint64(0):
                bits[w] |= np.uint64(1) << b
                drawn[count] = r
                count += 1
        bits_to_positions(bits, positions, complement, n_items)
        for i in range(m):
            bits[drawn[i] >> 6] = np.uint64(0)
        if weights.shape[0] > 0:
            out_es[p] = walk_es(weights, positions, n_items)
        if out_positions.shape[0] > 0:
            out_positions[p, :] = positions


@numba.njit(cache=True, nogil=True)
def gseapy_null(weights, hits, n_permutations, state):
    n_items = weights.shape[0]
    bits = hit_bits(hits, n_items)
    out = np.empty(n_permutations, dtype=np.float64)
    gseapy_null_into(weights, bits, hits.shape[0], state, out)
    return out


@numba.njit(cache=True, nogil=True)
def hit_bits(hits, n_items):
    """The hit set as an n-bit set (the array gseapy's permutations shuffle in turn)."""
    bits = np.zeros((n_items + 63) // 64, dtype=np.uint64)
    for h in hits:
        bits[h >> 6] |= np.uint64(1) << np.uint64(h & 63)
    return bits


@numba.njit(cache=True, nogil=True)
def gseapy_null_into(weights, bits, k, state, out):
    """Fill ``out`` with the next ``len(out)`` permutations' ES. gseapy shuffles one array in
    place, permutation after permutation, so ``bits`` and ``state`` carry the stream from one call
    to the next: calls on consecutive slices of ``out`` give the sequence of one call."""
    n_items = weights.shape[0]
    positions = np.empty(k, dtype=np.int64)
    for p in range(out.shape[0]):
        if n_items > 1:
            shuffle_bits(state, bits, n_items)
        bits_to_positions(bits, positions, False, n_items)
        out[p] = walk_es(weights, positions, n_items)
