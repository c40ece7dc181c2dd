"""GSEA prerank of one gene set, computed from hit positions so that it scales to 10M+ items.

Definitions follow gseapy 1.3.1's ``prerank`` (Subramanian et al., PNAS 2005,
https://doi.org/10.1073/pnas.0506580102; gseapy: Fang et al., Bioinformatics 2023,
https://doi.org/10.1093/bioinformatics/btac757):

* the ranked list has ``n`` items with rank metric ``r_i`` (descending); the weighted metric is
  ``w_i = |r_i|^p``; the gene set occupies sorted positions ``s_1 < ... < s_k``;
* running sum: at a hit add ``w_i / N_R`` (``N_R`` = sum of ``w`` over the hits), at a miss subtract
  ``1 / (n - k)``; ES is the deviation of largest magnitude (first one on ties), evaluated just before
  and just after each hit, exactly as gseapy's Rust ``fast_random_walk`` does, so ES is bit-identical;
* null: ES of random item permutations. A permutation of the item labels moves the ``k`` set members
  to a uniformly random ``k``-subset of positions, so each null ES costs O(k + n/64) from a sorted
  random subset drawn into an n-bit set ("fast" stream), never an ``n x permutations`` matrix (gseapy holds ~39 bytes x n x
  permutations). The "gseapy" stream instead replays gseapy's own permutations: SmallRng
  (Xoshiro256++ seeded with SplitMix64) and rand 0.9's Fisher-Yates with ``IncreasingUniform``,
  applied cumulatively to one index vector, tracking only which positions hold set members (a bitset),
  O(n) integer work per permutation but no per-permutation allocation; its NES and p-value equal
  gseapy's exactly;
* NES = ES / mean(null ES >= 0) for ES >= 0, ES / |mean(null ES < 0)| otherwise (a side with no null
  values uses ES itself); nominal p = #(null as or more extreme, same sign) / #(null of that sign).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from grnx_core.progress import progress

_MASK64 = (1 << 64) - 1


@dataclass
class PrerankResult:
    """ES, NES and nominal p-value of one gene set against one ranked list."""

    es: float
    nes: float
    pvalue: float
    n_items: int
    n_hits: int
    null_es: np.ndarray = field(repr=False)
    hits: np.ndarray = field(repr=False)


_KERNELS: dict[str, object] = {}


def _kernels() -> dict[str, object]:
    """The numba kernels, imported (and compiled or loaded from numba's cache) on first use."""
    if not _KERNELS:
        from grnx_plugins.evaluators import _gsea_kernels as k

        _KERNELS.update(
            walk_es=k.walk_es,
            hit_bits=k.hit_bits,
            gseapy_null_into=k.gseapy_null_into,
            random_subsets=k.random_subsets,
        )
    return _KERNELS


def splitmix_seed(seed: int) -> np.ndarray:
    """Xoshiro256++ state from a u64 seed, as rand 0.9's ``seed_from_u64`` (SplitMix64)."""
    state = seed & _MASK64
    words = []
    for _ in range(4):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        words.append(z ^ (z >> 31))
    return np.array(words, dtype=np.uint64)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def weighted_metric(metric: np.ndarray, weight: float) -> np.ndarray:
    """``|r|^p`` as gseapy computes it (p = 1 leaves |r| exact)."""
    metric = np.abs(np.asarray(metric, dtype=np.float64))
    return metric if weight == 1.0 else np.power(metric, weight)


def enrichment_score(weights: np.ndarray, hits: np.ndarray) -> float:
    """ES of hits at sorted ``hits`` positions over the weighted metric ``weights``."""
    hits = np.ascontiguousarray(hits, dtype=np.int64)
    _check_hits(hits, len(weights))
    return float(_kernels()["walk_es"](np.ascontiguousarray(weights, dtype=np.float64), hits, len(weights)))


def null_enrichment_scores(
    weights: np.ndarray,
    hits: np.ndarray,
    n_permutations: int,
    *,
    stream: str = "fast",
    seed: int = 0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """ES of ``n_permutations`` random permutations of the item labels.

    ``stream="fast"``: each permutation places the ``k`` hits on a uniformly random sorted
    ``k``-subset of positions (distinct draws marked in an n-bit set, read back in order): O(k + n/64)
    time per permutation and n/8 bytes in all. Draws come from Xoshiro256++ seeded by ``rng`` when
    given, else by ``seed``. ``stream="gseapy"``: gseapy 1.3.1's permutation sequence for ``seed``.
    """
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    hits = np.ascontiguousarray(hits, dtype=np.int64)
    n_items, k = len(weights), len(hits)
    _check_hits(hits, n_items)
    kernels = _kernels()
    if n_permutations <= 0:
        return np.zeros(0, dtype=np.float64)
    if stream not in ("fast", "gseapy"):
        raise ValueError(f"stream must be 'fast' or 'gseapy', got {stream!r}")
    out = np.empty(n_permutations, dtype=np.float64)
    # Both kernels carry their random state (and gseapy's shuffled hit set) across calls, so the
    # permutations run in slices for progress without changing a single draw.
    if stream == "gseapy":
        state = splitmix_seed(int(seed))
        bits = kernels["hit_bits"](hits, n_items)

        def fill(block: np.ndarray) -> None:
            kernels["gseapy_null_into"](weights, bits, k, state, block)
    else:
        state = _fast_state(seed, rng)
        no_positions = np.empty((0, k), np.int64)

        def fill(block: np.ndarray) -> None:
            kernels["random_subsets"](n_items, k, len(block), state, weights, block, no_positions)

    step = max(1, -(-n_permutations // 50))
    with progress(
        total=n_permutations, desc=f"NES null: {n_items:,} ranked items", unit="permutation"
    ) as bar:
        for start in range(0, n_permutations, step):
            block = out[start : start + step]
            fill(block)
            bar.update(len(block))
    return out


def _fast_state(seed: int, rng: np.random.Generator | None) -> np.ndarray:
    """Xoshiro256++ state of the fast stream: from ``rng`` when given, else from ``seed``.

    Offset from gseapy's seeding so the two streams are never the same draws by accident.
    """
    if rng is not None:
        return splitmix_seed(int(rng.integers(0, 2**63)))
    return splitmix_seed(int(seed) ^ 0x5DEECE66D)


def random_sorted_subsets(n: int, k: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` uniformly random sorted k-subsets of range(n), as the fast stream draws them."""
    out = np.empty((count, k), dtype=np.int64)
    state = _fast_state(seed, None)
    _kernels()["random_subsets"](n, k, count, state, np.empty(0), np.empty(count), out)
    return out


def normalise(es: float, null: np.ndarray) -> tuple[float, float]:
    """NES and nominal p-value from the null ES, as gseapy's ``normalize`` and ``pval``."""
    positive = null[null >= 0]
    negative = null[null < 0]
    # Sequential sums (not numpy's pairwise sum) so the mean is bit-identical to gseapy's Rust.
    pos_mean = _sequential_sum(positive) / len(positive) if len(positive) else es
    neg_mean = _sequential_sum(negative) / len(negative) if len(negative) else es
    nes = es / pos_mean if es >= 0 else es / abs(neg_mean)
    if es < 0:
        denominator, numerator = len(negative), int(np.count_nonzero(null <= es))
    else:
        denominator, numerator = len(positive), int(np.count_nonzero(null >= es))
    pvalue = 1.0 if denominator == 0 else numerator / denominator
    return float(nes), float(pvalue)


def prerank(
    metric: np.ndarray,
    hits: np.ndarray,
    *,
    weight: float = 1.0,
    n_permutations: int = 1000,
    seed: int = 0,
    stream: str = "fast",
    rng: np.random.Generator | None = None,
) -> PrerankResult:
    """ES, NES and p-value of the set at sorted positions ``hits`` of a descending-ranked list."""
    weights = weighted_metric(metric, weight)
    hits = np.ascontiguousarray(hits, dtype=np.int64)
    es = enrichment_score(weights, hits)
    null = null_enrichment_scores(weights, hits, n_permutations, stream=stream, seed=seed, rng=rng)
    nes, pvalue = normalise(es, null) if len(null) else (float("nan"), float("nan"))
    return PrerankResult(
        es=es, nes=nes, pvalue=pvalue, n_items=len(weights), n_hits=len(hits), null_es=null, hits=hits
    )


def running_sum_at_hits(weights: np.ndarray, hits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The running sum just before (``bottoms``) and just after (``tops``) each hit.

    Between hits the running sum falls linearly, so these 2k points draw the whole curve exactly.
    """
    weights = np.asarray(weights, dtype=np.float64)
    hits = np.asarray(hits, dtype=np.int64)
    k, n_items = len(hits), len(weights)
    steps = weights[hits]
    total = steps.sum()
    steps = steps / total if total > 0 else np.full(k, 1.0 / k)
    misses_before = hits - np.arange(k)
    tops = np.cumsum(steps) - misses_before / (n_items - k)
    return tops - steps, tops


def _sequential_sum(values: np.ndarray) -> float:
    total = 0.0
    for value in values.tolist():
        total += value
    return total


def _check_hits(hits: np.ndarray, n_items: int) -> None:
    k = len(hits)
    if k == 0:
        raise ValueError("the gene set has no member in the ranked list")
    if k >= n_items:
        raise ValueError(f"the gene set ({k}) must be smaller than the ranked list ({n_items})")
    if hits[0] < 0 or hits[-1] >= n_items or (k > 1 and np.any(np.diff(hits) <= 0)):
        raise ValueError("hit positions must be sorted, distinct and inside the list")
