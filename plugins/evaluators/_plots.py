"""Figures drawn by the evaluators (matplotlib, no display needed)."""

from __future__ import annotations

import numpy as np


def _figure(**kwargs):
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def enrichment_plot(weights: np.ndarray, hits: np.ndarray, es: float, nes: float, pvalue: float, title: str):
    """GSEA running-sum plot: the enrichment curve (exact, from its 2k corner points) and the hit rug."""
    from grnx_plugins.evaluators._gsea import running_sum_at_hits

    n_items = len(weights)
    bottoms, tops = running_sum_at_hits(weights, hits)
    x = np.empty(2 * len(hits) + 2)
    y = np.empty_like(x)
    x[0], y[0] = 0, 0.0
    x[1:-1:2], y[1:-1:2] = hits, bottoms
    x[2:-1:2], y[2:-1:2] = hits, tops
    x[-1], y[-1] = n_items - 1, 0.0
    figure = _figure(figsize=(6.5, 4.5), layout="constrained")
    axes_curve, axes_rug = figure.subplots(2, 1, sharex=True, height_ratios=[4, 1])
    axes_curve.plot(x, y, color="#2a9d8f", linewidth=1.2)
    axes_curve.axhline(0, color="grey", linewidth=0.6)
    peak = int(np.argmax(np.abs(np.r_[tops, bottoms])))
    peak_x = hits[peak % len(hits)]
    axes_curve.axvline(peak_x, color="#e76f51", linestyle="--", linewidth=0.8)
    axes_curve.set_ylabel("running enrichment score")
    axes_curve.set_title(f"{title}\nES={es:.3f}  NES={nes:.3f}  p={pvalue:.3g}  hits={len(hits)}/{n_items}")
    axes_rug.vlines(hits, 0, 1, color="black", linewidth=0.3)
    axes_rug.set_yticks([])
    axes_rug.set_xlim(0, max(n_items - 1, 1))
    axes_rug.set_xlabel("rank of gene pair")
    return figure


def pr_roc_plot(recall, precision, fpr, tpr, baseline: float, title: str):
    """Precision-recall and ROC curves with their random baselines."""
    figure = _figure(figsize=(9, 4), layout="constrained")
    axes_pr, axes_roc = figure.subplots(1, 2)
    axes_pr.step(recall, precision, where="post", color="#264653")
    axes_pr.axhline(baseline, color="grey", linestyle="--", linewidth=0.8, label=f"random {baseline:.3g}")
    axes_pr.set_xlabel("recall")
    axes_pr.set_ylabel("precision")
    axes_pr.set_xlim(0, 1)
    if baseline < 0.05:  # sparse networks: a linear axis would flatten the curve onto zero
        axes_pr.set_yscale("log")
        axes_pr.set_ylim(max(baseline / 5, 1e-6), 1.05)
    else:
        axes_pr.set_ylim(0, 1.02)
    axes_pr.legend(loc="upper right")
    axes_roc.plot(fpr, tpr, color="#264653")
    axes_roc.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    axes_roc.set_xlabel("false positive rate")
    axes_roc.set_ylabel("true positive rate")
    figure.suptitle(title)
    return figure


def confusion_plot(matrix: np.ndarray, labels: list[str], title: str):
    """Confusion matrix (rows: true class, columns: predicted), counts with row-normalised colour."""
    n_classes = len(labels)
    size = min(3 + 0.45 * n_classes, 14)
    figure = _figure(figsize=(size + 1, size), layout="constrained")
    axes = figure.subplots()
    totals = matrix.sum(axis=1, keepdims=True)
    fraction = np.divide(matrix, totals, out=np.zeros_like(matrix, dtype=float), where=totals > 0)
    image = axes.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, label="fraction of true class")
    if n_classes <= 30:
        for i in range(n_classes):
            for j in range(n_classes):
                axes.text(
                    j,
                    i,
                    str(int(matrix[i, j])),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if fraction[i, j] > 0.5 else "black",
                )
    axes.set_xticks(range(n_classes), labels, rotation=60, ha="right", fontsize=7)
    axes.set_yticks(range(n_classes), labels, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    return figure
