"""Precision-recall / ROC summaries over a candidate universe, from a ranked list and grouped ties.

Candidates missing from the ranked list are tied at the lowest score, as one last threshold, so a
universe of hundreds of millions of pairs costs only the length of the list.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Curves:
    """Cumulative true/false positives at each distinct score threshold (descending)."""

    tps: np.ndarray
    fps: np.ndarray
    n_positive: int
    n_candidates: int

    @property
    def n_negative(self) -> int:
        return self.n_candidates - self.n_positive

    def average_precision(self) -> float:
        """sum over thresholds of (R_t - R_{t-1}) P_t: scikit-learn's ``average_precision_score``."""
        precision = self.tps / np.maximum(self.tps + self.fps, 1)
        recall_step = np.diff(np.r_[0, self.tps]) / self.n_positive
        return float(np.sum(recall_step * precision))

    def pr_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(recall, precision) as scikit-learn's ``precision_recall_curve`` (stops at full recall, ends at (0, 1))."""
        last = int(np.searchsorted(self.tps, self.tps[-1]))
        tps, fps = self.tps[: last + 1], self.fps[: last + 1]
        precision = np.divide(tps, tps + fps, out=np.ones(len(tps)), where=(tps + fps) > 0)
        recall = tps / self.n_positive
        return np.r_[recall[::-1], 0.0], np.r_[precision[::-1], 1.0]

    def auprc_trapezoid(self) -> float:
        """Trapezoidal area under the PR curve (BEELINE: ``auc(recall, precision)``)."""
        recall, precision = self.pr_curve()
        return float(-np.trapezoid(precision, recall))

    def roc_curve(self) -> tuple[np.ndarray, np.ndarray]:
        fpr = np.r_[0.0, self.fps / max(self.n_negative, 1)]
        tpr = np.r_[0.0, self.tps / self.n_positive]
        return fpr, tpr

    def auroc(self) -> float:
        fpr, tpr = self.roc_curve()
        return float(np.trapezoid(tpr, fpr))


def curves(labels: np.ndarray, scores: np.ndarray, n_positive: int, n_candidates: int) -> Curves:
    """Thresholds over a descending ``scores`` list with 0/1 ``labels``, plus the unscored rest."""
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    n_listed = len(labels)
    if n_listed:
        last_of_group = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])
        tps = np.cumsum(labels)[last_of_group]
        fps = last_of_group + 1 - tps
    else:
        tps = fps = np.zeros(0, dtype=np.int64)
    if n_listed < n_candidates:
        tps = np.r_[tps, n_positive]
        fps = np.r_[fps, n_candidates - n_positive]
    return Curves(
        tps=tps.astype(np.int64),
        fps=fps.astype(np.int64),
        n_positive=int(n_positive),
        n_candidates=int(n_candidates),
    )


def early_precision(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Precision among the top-k predictions, ties at the k-th score included (BEELINE's EPR)."""
    labels = np.asarray(labels)
    if len(labels) == 0 or k <= 0:
        return 0.0
    cutoff = scores[min(k, len(scores)) - 1]
    top = int(np.searchsorted(-np.asarray(scores), -cutoff, side="right"))
    return float(labels[:top].sum() / top)


def best_ranking(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same listed items re-ranked true first, with distinct descending scores: the best ranking
    of that list (for average precision, trapezoidal AUPRC, AUROC and early precision alike), the
    unlisted candidates staying tied below it."""
    ordered = np.sort(np.asarray(labels, dtype=bool))[::-1]
    return ordered, -np.arange(len(ordered), dtype=np.float64)
