"""How diverse a cell sample is: rare-state recovery, effective sample size, Hausdorff distance.

Used by the ``sampler_diversity`` evaluator and ``benchmarks/bench_samplers.py``. Definitions:

- rare-state recovery of a set of cells ``S``: ``(|sample ∩ S| / |sample|) / (|S| / n)``, the share
  of ``S`` in the sample over its share in the data (1: as a uniform sample in expectation; 2:
  twice over-represented; 0: missed);
- effective sample size of weights ``w``: ``(sum w)^2 / sum w^2`` (Kish 1965), ``n`` for equal weights;
- directed Hausdorff distance from the data to the sample: ``max_x min_s ||x - s||`` over all cells
  ``x`` and sampled cells ``s`` (the farthest any cell is from the sample; Hie et al. 2019 use it
  to compare sketches), with the mean of ``min_s ||x - s||`` beside it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: Cells queried against the KD-tree of the sample at a time (bounds the distance buffers).
QUERY_CHUNK = 65_536


def effective_sample_size(weights: np.ndarray) -> float:
    """Kish's ``(sum w)^2 / sum w^2``; the weights must be non-negative and not all zero."""
    weights = np.asarray(weights, dtype=np.float64)
    return float(weights.sum() ** 2 / np.sum(weights**2))


def recovery(members: np.ndarray, indices: np.ndarray) -> float:
    """Share of ``members`` (boolean over all cells) in the sample ``indices`` over its share in the data."""
    members = np.asarray(members, dtype=bool)
    expected = members.mean()
    return float(members[indices].mean() / expected)


def rare_groups(labels: pd.Series, max_share: float) -> list[str]:
    """Groups of ``labels`` holding less than ``max_share`` of the cells, rarest first."""
    shares = labels.astype(str).value_counts(normalize=True, sort=False)
    rare = shares[shares < max_share]
    return [str(group) for group in rare.sort_values(kind="stable").index]


def nearest_sample_distances(coordinates: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Euclidean distance of every cell to its nearest sampled cell (0 for the sampled ones)."""
    from scipy.spatial import cKDTree

    tree = cKDTree(coordinates[indices])
    distances = np.empty(coordinates.shape[0])
    for start in range(0, coordinates.shape[0], QUERY_CHUNK):
        stop = min(coordinates.shape[0], start + QUERY_CHUNK)
        distances[start:stop], _ = tree.query(coordinates[start:stop], k=1)
    return distances


def directed_hausdorff_to_sample(coordinates: np.ndarray, indices: np.ndarray) -> tuple[float, float]:
    """``(max, mean)`` over all cells of the distance to the nearest sampled cell."""
    distances = nearest_sample_distances(coordinates, indices)
    return float(distances.max()), float(distances.mean())
