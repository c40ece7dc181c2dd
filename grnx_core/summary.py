"""The compact summary ``grnx run`` prints: a row per extractor, a column per headline metric.

Headline metrics are those a reader compares first: AUPRC over its random baseline and EPR
(BEELINE conventions), NES and its p-value, and the model's accuracy and balanced accuracy. Metric
names follow ``eval/<evaluator id>/<extractor id>/<metric>`` (the auprc evaluator's with
``<universe tag>/`` before the metric); for a nested run the parent holds
``<metric>.mean`` over the repeats, which the table shows with its ``.std``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

#: (column header, metric leaf) for the per-extractor table, in column order.
PAIR_HEADLINES = (
    ("AUPRC/rand", "auprc_ratio"),
    ("EPR", "epr"),
    ("NES", "nes"),
    ("p", "pvalue"),
    ("NES MSE vs all", "nes_mse"),
)
#: (label, metric leaf) of the model line.
MODEL_HEADLINES = (("accuracy", "accuracy"), ("balanced accuracy", "balanced_accuracy"))


def _format(value: float | None, spread: float | None = None) -> str:
    if value is None:
        return "-"
    text = f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.3f}"
    return f"{text}±{spread:.2g}" if spread is not None else text


def _split(name: str) -> tuple[str, str | None]:
    """``x.mean`` -> (``x``, "mean"); a plain metric -> (name, None)."""
    for suffix in ("mean", "std", "n", "reference"):
        if name.endswith(f".{suffix}"):
            return name[: -len(suffix) - 1], suffix
    return name, None


def headline_table(metrics: dict[str, float], extractors: list[str]) -> list[str]:
    """Lines of the per-extractor table and the model line; empty when no headline metric exists."""
    values: dict[tuple[str, str, str], dict[str | None, float]] = defaultdict(dict)
    model: dict[tuple[str, str], dict[str | None, float]] = defaultdict(dict)
    pair_leaves = {leaf for _, leaf in PAIR_HEADLINES}
    model_leaves = {leaf for _, leaf in MODEL_HEADLINES}
    for name, value in metrics.items():
        base, suffix = _split(name)
        group = ""
        if base.startswith("sweep/"):  # sweep/<group>/eval/...: one row per group and extractor
            _, group, base = base.split("/", 2)
        parts = base.split("/")
        if suffix not in (None, "mean", "std") or len(parts) < 3 or parts[0] != "eval":
            continue
        # eval/<evaluator>/<extractor>/<metric>, or .../<extractor>/<universe>/<metric> (auprc)
        if len(parts) in (4, 5) and parts[-1] in pair_leaves:
            row_name = f"{group} {parts[2]}" if group else parts[2]
            values[(parts[1], row_name, parts[-1])][suffix] = value
        elif len(parts) == 3 and parts[2] in model_leaves:
            model[(parts[1] + (f" {group}" if group else ""), parts[2])][suffix] = value
    lines: list[str] = []
    columns: list[tuple[str, str, str]] = []  # (header, evaluator id, leaf)
    for header, leaf in PAIR_HEADLINES:
        evaluators = sorted({e for (e, _, metric) in values if metric == leaf})
        for evaluator in evaluators:
            columns.append((header if len(evaluators) == 1 else f"{header} [{evaluator}]", evaluator, leaf))
    rows = [
        x
        for x in dict.fromkeys([*extractors, *sorted({x for (_, x, _) in values})])
        if any((e, x, leaf) in values for _, e, leaf in columns)
    ]
    if columns and rows:
        table = [
            ["extractor" if not any(" " in r for r in rows) else "group extractor", *(c[0] for c in columns)]
        ]
        for extractor in rows:
            cells = [extractor]
            for _, evaluator, leaf in columns:
                found = values.get((evaluator, extractor, leaf), {})
                shown = found.get(None, found.get("mean"))
                if leaf == "pvalue" and shown is not None:  # p-values read best with 2 significant digits
                    cells.append(f"{shown:.2g}")
                else:
                    cells.append(_format(shown, found.get("std")))
            table.append(cells)
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    by_text: dict[str, list[str]] = {}
    for evaluator in sorted({e for (e, _) in model}):
        parts = []
        for label, leaf in MODEL_HEADLINES:
            scores = model.get((evaluator, leaf))
            if scores:
                parts.append(f"{label} {_format(scores.get(None, scores.get('mean')), scores.get('std'))}")
        by_text.setdefault(", ".join(parts), []).append(evaluator)
    for text, evaluators in by_text.items():  # a model shared by every sweep group is one line
        name = (
            evaluators[0]
            if len(evaluators) == 1
            else f"{evaluators[0].split(' ')[0]}, {len(evaluators)} groups"
        )
        lines.append(f"model ({name}): {text}")
    return lines


def stage_line(stages: list[Any]) -> str:
    """``stages: 5 computed, 3 from the cache (data, sample, model)``.

    Counts are over every stage each child ran; evaluators always compute. The names list the
    stages served from the cache at least once (the memo of a nested run included).
    """
    n_cached = sum(1 for s in stages if s.cached)
    cached = list(dict.fromkeys(s.stage for s in stages if s.cached))
    text = f"stages: {len(stages) - n_cached} computed, {n_cached} from the cache"
    return text + (f" ({', '.join(cached)})" if cached else "")
