"""``grnx report``: an experiment's runs as a markdown report, with a table and a figure per metric.

Runs are read from the tracking store (``grnx_core.compare`` reads them, through
:class:`grnx_core.tracking.Tracker`). The unit of measurement is a *leaf* run: one that has no
nested runs of its own (a repeat, a sweep point, the full-data reference, or a plain run). Leaves
are grouped, per recipe (tag ``grnx.recipe``), by the params that differ between them
(``grnx_core.compare``'s rule), less the repeat axis (``sampler.seed``, the one param the repeats of
a group differ in) and less params that the others already determine (a WDS-only sampler param is
a function of ``sampler.name``). The full-data reference runs (tag ``grnx.child: reference``) have
no sampler, so they form rows of their own, grouped by the columns that are not ``sampler.*``.

Metrics are found by their names, not from a list: ``eval/<evaluator id>/<...>/<metric>``, where the
metric is the last segment the evaluator declares (``higher_is_better`` or ``informational``; the
last segment when the evaluator cannot be loaded) and the segments left (``<extractor>``, or
``<extractor>/<universe>``, or a class) say what it measured. A table is written for every metric
with a direction: per group and subject, the number of runs n, the mean and its two-sided
t-interval, ``mean +- t_{(1+c)/2, n-1} s / sqrt(n)`` with s the standard deviation (ddof 1)
(Student 1908; ``scipy.stats.t``), the random baseline where the evaluator logged one
(``<metric>_random``, or ``<metric>_chance``) with the ratio of the mean to it, and Pearson's value
beside it: scored over the subject's own pairs where the evaluator did so (``<metric>_of_<id>``,
with the per-run ratio ``<metric>_vs_<id>`` and its interval; the auprc evaluator's
``baseline_extractor``), else the ``pearson`` extractor's own metric in the same runs (same ground
truth and universe rule) with the ratio of the means. ``*_ratio`` and ``*_vs_<id>`` metrics are
left out when their base is tabulated, since they are its columns.
A figure shows each metric against the swept fraction (or ``x``), a panel per subject,
a line per value of the other settings of the same kind (e.g. the sampler), the random baseline
dashed and the full-data reference dotted.

The aggregates a parent run logs beyond mean/std/n (an evaluator's ``aggregate``, e.g. NES MSE
against the full data) are listed as the parent logged them.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from grnx_core.atomic import atomic_path, write_text
from grnx_core.compare import PARENT_TAG, _differing_params, _runs, set_params
from grnx_core.errors import GrnxError

CONFIDENCE = 0.95
#: Params the repeats of one group differ in (``grnx_core.expansion`` sets them per repeat).
REPEAT_PARAMS: tuple[str, ...] = ("sampler.seed",)
ROLE_TAG = "grnx.child"
RECIPE_TAG = "grnx.recipe"
REFERENCE_ROLE = "reference"
#: The column telling sampled runs from the full-data reference, shown when references exist.
CELLS_COLUMN = "cells"
SAMPLED, ALL_CELLS = "sample", "all (reference)"
#: Suffixes of a metric's baseline, in order of preference (auprc: ``_random``; classification: ``_chance``).
BASELINE_SUFFIXES = ("_random", "_chance")
PEARSON = "pearson"
#: Suffixes of the parent's per-group summaries of the leaves' metrics (the report recomputes them).
_SUMMARY_SUFFIXES = (".mean", ".std", ".n", ".reference")
_MISSING = "—"


# -- statistics ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """Mean of n values and its two-sided t-interval (low = high = NaN below 2 values)."""

    mean: float
    low: float
    high: float
    n: int
    std: float


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """``mean +- t_{(1+confidence)/2, n-1} * s / sqrt(n)``, s the sample standard deviation (ddof 1).

    The Student t-interval for a mean ("Student", The probable error of a mean, Biometrika 1908,
    https://doi.org/10.1093/biomet/6.1.1), with the quantile from ``scipy.stats.t.ppf``. NaN values
    are left out; no value gives NaN.
    """
    from scipy import stats

    array = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(array)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, math.nan)
    mean = float(array.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, math.nan)
    std = float(array.std(ddof=1))
    half = float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, std)


# -- metric names -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricName:
    """``eval/<evaluator>/<subject...>/<metric>[/<qualifier...>]`` taken apart."""

    key: str
    evaluator: str
    metric: str
    subject: tuple[str, ...]  # what was measured: (extractor,), (extractor, universe), (class,), ()
    index: int  # where the metric sits among the segments after the evaluator

    def with_metric(self, metric: str) -> str:
        """The key of another metric about the same subject, e.g. its ``_random`` baseline."""
        parts = self.key.split("/")
        parts[2 + self.index] = metric
        return "/".join(parts)

    def with_extractor(self, extractor: str) -> str:
        """The same metric of another extractor (the subject's first segment replaced)."""
        parts = self.key.split("/")
        parts[2 if self.index != 0 else 3] = extractor
        return "/".join(parts)


def parse_metric(key: str, declares: Any = None) -> MetricName | None:
    """Take an ``eval/`` metric key apart; None for other keys.

    ``declares(segment)`` says whether the evaluator declares a metric of that name; the metric is
    the last segment it declares (``f1`` in ``f1/B cell``), else the last segment.
    """
    parts = key.split("/")
    if len(parts) < 3 or parts[0] != "eval":
        return None
    rest = parts[2:]
    index = len(rest) - 1
    if declares is not None:
        declared = [i for i, segment in enumerate(rest) if declares(segment)]
        if declared:
            index = declared[-1]
    subject = tuple(rest[:index] + rest[index + 1 :])
    return MetricName(key, parts[1], rest[index], subject, index)


def _evaluator_classes(leaves: Sequence[Any]) -> dict[str, Any]:
    """Evaluator id -> its class, for the evaluators the leaves' params name (those that load)."""
    from grnx_core.components import Kind
    from grnx_core.registry import default_registry

    names: dict[str, str] = {}
    for run in leaves:
        for step_id, name in _steps(run.data.params, "evaluators").items():
            names.setdefault(step_id, name)
    classes = {}
    registry = None
    for step_id, name in names.items():
        try:
            registry = registry or default_registry()
            classes[step_id] = registry.entry(Kind.EVALUATOR, name).load()
        except Exception:  # an uninstalled plugin: its metrics are still reported, by last segment
            continue
    return classes


def _steps(params: dict[str, str], section: str) -> dict[str, str]:
    """Step id -> component name of a recipe list (``extractors``, ``evaluators``) from flat params."""
    found = {}
    index = 0
    while f"{section}.{index}.name" in params:
        name = params[f"{section}.{index}.name"]
        step_id = params.get(f"{section}.{index}.id")
        found[name if step_id in (None, "", "null", "None") else step_id] = name
        index += 1
    return found


# -- grouping -----------------------------------------------------------------------------------


def _children_of(runs: Sequence[Any]) -> dict[str, list[Any]]:
    children: dict[str, list[Any]] = {}
    for run in runs:
        parent = run.data.tags.get(PARENT_TAG)
        if parent:
            children.setdefault(parent, []).append(run)
    return children


def _top_of(run: Any, by_id: dict[str, Any]) -> Any:
    while (parent := run.data.tags.get(PARENT_TAG)) in by_id:
        run = by_id[parent]
    return run


def _number(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _sort_key(value: Any, order: dict[str, int] | None = None) -> tuple[int, float, str]:
    """Numbers in numeric order, then text (in ``order``, e.g. the order the runs ran, so a sweep's
    samplers keep the recipe's order; else alphabetically), then missing values and the reference."""
    if value is None or value == ALL_CELLS or (isinstance(value, float) and math.isnan(value)):
        return (2, 0.0, str(value))
    number = _number(value)
    if number is not None:
        return (0, number, "")
    return (1, float((order or {}).get(str(value), 0)), str(value))


def _first_seen(values: Iterable[Any]) -> dict[str, int]:
    order: dict[str, int] = {}
    for value in values:
        order.setdefault(str(value), len(order))
    return order


def _refining(rows: list[dict[str, Any]], columns: list[str]) -> tuple[list[str], list[str]]:
    """The columns that split the rows further than the ones before them, and those that do not."""
    kept: list[str] = []
    dropped: list[str] = []
    for column in columns:
        before = {tuple(row.get(c) for c in kept) for row in rows}
        after = {tuple(row.get(c) for c in [*kept, column]) for row in rows}
        (kept if len(after) > len(before) else dropped).append(column)
    return kept, dropped


@dataclass
class Section:
    """The leaves of one recipe, grouped."""

    recipe: str
    top_runs: list[Any]
    leaves: list[Any]  # finished, newest of each identical run
    unfinished: list[Any]
    superseded: int
    group_columns: list[str]
    determined_columns: list[str]
    repeat_values: dict[str, list[str]]
    has_reference: bool
    rows: pd.DataFrame  # a row per leaf: run_id, group columns, then every metric
    evaluators: dict[str, Any] = field(default_factory=dict)
    extractors: dict[str, str] = field(default_factory=dict)  # id -> component name

    @property
    def columns(self) -> list[str]:
        return ([CELLS_COLUMN] if self.has_reference else []) + self.group_columns


def _swept_first(columns: list[str], top_runs: list[Any]) -> list[str]:
    """Swept paths (named in a parent's ``sweep.grid.<path>.<i>`` params) first, then the others."""
    swept_params = [name for run in top_runs for name in run.data.params if name.startswith("sweep.grid.")]

    def position(column: str) -> tuple[int, int, str]:
        for index, name in enumerate(swept_params):
            if name.startswith(f"sweep.grid.{column}."):
                return (0, index, column)
        return (1, 0, column)

    return sorted(columns, key=position)


def build_section(
    recipe: str, runs: list[Any], all_runs: list[Any], repeat_params: Sequence[str] = REPEAT_PARAMS
) -> Section:
    """Group the leaf runs of one recipe (``runs``: its runs, parents included)."""
    by_id = {run.info.run_id: run for run in all_runs}
    children = _children_of(all_runs)
    leaves = [run for run in runs if run.info.run_id not in children]
    tops = list({id(t): t for t in (_top_of(run, by_id) for run in runs)}.values())
    finished = [run for run in leaves if run.info.status == "FINISHED"]
    unfinished = [run for run in leaves if run.info.status != "FINISHED"]
    # A rerun of the same child (same params, same role) replaces the earlier one: counting both
    # would add a repeat that is not one.
    params = {run.info.run_id: set_params(run) for run in leaves}  # once per run, read below
    newest: dict[tuple[Any, ...], Any] = {}
    for run in sorted(finished, key=lambda r: r.info.start_time or 0):
        identity = (run.data.tags.get(ROLE_TAG), tuple(sorted(params[run.info.run_id].items())))
        newest[identity] = run
    kept = sorted(newest.values(), key=lambda r: r.info.start_time or 0)
    sampled = [run for run in kept if run.data.tags.get(ROLE_TAG) != REFERENCE_ROLE]
    references = [run for run in kept if run.data.tags.get(ROLE_TAG) == REFERENCE_ROLE]
    basis = sampled or references
    differing = [name for name in _differing_params(basis) if name not in repeat_params]
    records = [{name: params[run.info.run_id].get(name) for name in differing} for run in basis]
    group_columns, determined = _refining(records, _swept_first(differing, tops))
    repeat_values = {
        name: sorted({str(params[run.info.run_id].get(name)) for run in basis}, key=_sort_key)
        for name in repeat_params
        if len({params[run.info.run_id].get(name) for run in basis}) > 1
    }
    rows = []
    for run in kept:
        reference = run.data.tags.get(ROLE_TAG) == REFERENCE_ROLE
        row: dict[str, Any] = {"run_id": run.info.run_id, CELLS_COLUMN: ALL_CELLS if reference else SAMPLED}
        for column in group_columns:
            # The reference has no sampler: its sampler settings are those of no run.
            row[column] = (
                ALL_CELLS
                if reference and column.startswith("sampler")
                else params[run.info.run_id].get(column)
            )
        row.update(run.data.metrics)
        rows.append(row)
    extractors: dict[str, str] = {}
    for run in kept:
        for step_id, name in _steps(run.data.params, "extractors").items():
            extractors.setdefault(step_id, name)
    return Section(
        recipe=recipe,
        top_runs=sorted(tops, key=lambda r: r.info.start_time or 0),
        leaves=kept,
        unfinished=unfinished,
        superseded=len(finished) - len(kept),
        group_columns=group_columns,
        determined_columns=determined,
        repeat_values=repeat_values,
        has_reference=bool(references) and bool(sampled),
        rows=pd.DataFrame(rows),
        evaluators=_evaluator_classes(kept),
        extractors=extractors,
    )


def sections_of(runs: list[Any], repeat_params: Sequence[str] = REPEAT_PARAMS) -> list[Section]:
    """A section per recipe (tag ``grnx.recipe``; runs without it share one), in order of first run."""
    by_recipe: dict[str, list[Any]] = {}
    for run in runs:
        by_recipe.setdefault(run.data.tags.get(RECIPE_TAG) or "(no recipe tag)", []).append(run)
    return [build_section(recipe, members, runs, repeat_params) for recipe, members in by_recipe.items()]


# -- tables -------------------------------------------------------------------------------------


@dataclass
class MetricTable:
    """One evaluator metric over the groups: a row per group and subject."""

    evaluator: str
    metric: str
    higher_is_better: bool | None
    table: pd.DataFrame  # group columns, subject, n, mean, std, low, high, baseline, pearson_*


def _declares(section: Section, evaluator: str) -> Any:
    cls = section.evaluators.get(evaluator)
    return cls.declares if cls is not None else None


def metric_names(section: Section) -> list[MetricName]:
    names = [
        column for column in section.rows.columns if isinstance(column, str) and column.startswith("eval/")
    ]
    parsed = []
    for name in names:
        evaluator = name.split("/")[1] if name.count("/") >= 2 else ""
        found = parse_metric(name, _declares(section, evaluator))
        if found is not None:
            parsed.append(found)
    return parsed


def _directed_metrics(
    section: Section, names: list[MetricName], patterns: Sequence[str] | None
) -> list[tuple[str, str]]:
    """(evaluator, metric) pairs to tabulate, in the evaluator's own order of declaration."""
    present: dict[tuple[str, str], None] = {}
    metrics_by_evaluator: dict[str, set[str]] = {}
    for name in names:
        metrics_by_evaluator.setdefault(name.evaluator, set()).add(name.metric)
    for name in sorted(names, key=lambda n: (n.evaluator, n.metric)):
        cls = section.evaluators.get(name.evaluator)
        metric = name.metric
        if patterns:
            if not any(fnmatch.fnmatchcase(metric, p) for p in patterns):
                continue
        elif cls is not None:
            if cls.metric_direction(metric) is None:
                continue  # informational: counts and baselines
        elif metric.endswith(BASELINE_SUFFIXES):
            continue
        if not patterns and metric.endswith("_ratio"):
            base = metric[: -len("_ratio")]
            siblings = metrics_by_evaluator[name.evaluator]
            if base in siblings and any(base + suffix in siblings for suffix in BASELINE_SUFFIXES):
                continue  # the base's mean over its baseline, shown beside the base
        versus = re.fullmatch(r"(.+)_vs_(.+)", metric)
        if not patterns and versus and versus.group(1) in metrics_by_evaluator[name.evaluator]:
            continue  # the per-run ratio to the baseline extractor: a column of the base's table
        present[(name.evaluator, metric)] = None

    def order(item: tuple[str, str]) -> tuple[str, int, str]:
        cls = section.evaluators.get(item[0])
        declared = list(cls.higher_is_better) if cls is not None else []
        return (item[0], declared.index(item[1]) if item[1] in declared else len(declared), item[1])

    return sorted(present, key=order)


def _pearson_id(section: Section) -> str | None:
    ids = [step_id for step_id, name in section.extractors.items() if name == PEARSON]
    if not ids:
        return None
    return PEARSON if PEARSON in ids else ids[0]


def _pearson_columns(
    section: Section, frame: pd.DataFrame, name: MetricName, pearson: str | None, confidence: float
) -> dict[str, Any]:
    """Pearson's value of the metric beside the subject's, and the subject's over Pearson's.

    Preferred: what the evaluator scored over the subject's own pairs (``<metric>_of_<baseline>``
    and the per-run ratio ``<metric>_vs_<baseline>``, the auprc evaluator's ``baseline_extractor``),
    with the ``pearson`` extractor as the baseline when it is one; else the ``pearson`` extractor's
    own metric in the same runs (the same ground truth and universe rule), with the ratio of the means.
    """
    metric = name.metric
    prefix = f"{metric}_of_"
    logged = [
        column[len(name.with_metric(prefix)) :]
        for column in frame.columns
        if isinstance(column, str)
        and column.startswith(name.with_metric(prefix))
        and "/" not in column[len(name.with_metric(prefix)) :]
        and frame[column].notna().any()
    ]
    same_pairs = None
    if logged:
        same_pairs = pearson if pearson in logged else sorted(logged)[0]
    out: dict[str, Any] = {}
    if same_pairs is not None:
        theirs = t_interval(frame[name.with_metric(prefix + same_pairs)].tolist(), confidence)
        out["baseline_extractor"] = same_pairs
        out["baseline_pairs"] = "same pairs"
        ratio_key = name.with_metric(f"{metric}_vs_{same_pairs}")
        if ratio_key in frame and frame[ratio_key].notna().any():
            # NaN where the baseline scored 0 (an EPR without a true pair in its top k): fewer runs
            ratio = t_interval(frame[ratio_key].tolist(), confidence)
            out.update(
                {
                    "ratio_mean": ratio.mean,
                    "ratio_low": ratio.low,
                    "ratio_high": ratio.high,
                    "ratio_n": ratio.n,
                }
            )
    elif (
        pearson is not None
        and name.subject
        and name.subject[0] in section.extractors
        and name.subject[0] != pearson
        and name.with_extractor(pearson) in frame
        and frame[name.with_extractor(pearson)].notna().any()
    ):
        theirs = t_interval(frame[name.with_extractor(pearson)].tolist(), confidence)
        out["baseline_extractor"] = pearson
        out["baseline_pairs"] = "own universe"
    else:
        return out
    out["baseline_label"] = (
        "Pearson"
        if section.extractors.get(out["baseline_extractor"]) == PEARSON
        else out["baseline_extractor"]
    )
    out.update({"pearson_mean": theirs.mean, "pearson_low": theirs.low, "pearson_high": theirs.high})
    if "ratio_mean" not in out and theirs.mean:
        mean = t_interval(frame[name.key].tolist(), confidence).mean
        out.update({"ratio_mean": mean / theirs.mean, "ratio_low": math.nan, "ratio_high": math.nan})
    return out


def metric_table(
    section: Section, evaluator: str, metric: str, confidence: float = CONFIDENCE
) -> MetricTable:
    """Mean and t-interval per group and subject of one evaluator metric, with baseline and Pearson."""
    names = [n for n in metric_names(section) if n.evaluator == evaluator and n.metric == metric]
    columns = section.columns
    rows = section.rows
    pearson = _pearson_id(section)
    records = []
    grouped = rows.groupby(columns, dropna=False, sort=False) if columns else [((), rows)]
    for key, frame in grouped:
        values = dict(zip(columns, key if isinstance(key, tuple) else (key,)))
        for name in names:
            if name.key not in frame or frame[name.key].isna().all():
                continue
            interval = t_interval(frame[name.key].tolist(), confidence)
            record: dict[str, Any] = {
                **values,
                "subject": "/".join(name.subject),
                "n": interval.n,
                "mean": interval.mean,
                "std": interval.std,
                "low": interval.low,
                "high": interval.high,
            }
            for suffix in BASELINE_SUFFIXES:
                baseline = name.with_metric(metric + suffix)
                if baseline in frame and frame[baseline].notna().any():
                    record["baseline"] = float(frame[baseline].mean())
                    record["baseline_name"] = metric + suffix
                    break
            record.update(_pearson_columns(section, frame, name, pearson, confidence))
            records.append(record)
    table = pd.DataFrame(records)
    if len(table):
        seen = {column: _first_seen(rows[column]) for column in columns}
        order = sorted(
            range(len(table)),
            key=lambda i: (
                tuple(_sort_key(table.iloc[i][c], seen[c]) for c in columns) + (table.iloc[i]["subject"],)
            ),
        )
        table = table.iloc[order].reset_index(drop=True)
    cls = section.evaluators.get(evaluator)
    direction = cls.metric_direction(metric) if cls is not None else None
    return MetricTable(evaluator, metric, direction, table)


# -- formatting ---------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _MISSING
    value = float(value)
    if value != 0 and (abs(value) < 0.01 or abs(value) >= 1e5):
        return f"{value:.3g}"
    return f"{value:.3f}"


def _interval_text(mean: Any, low: Any, high: Any) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return _MISSING
    if low is None or (isinstance(low, float) and math.isnan(low)):
        return f"{_fmt(mean)} (n = 1)"
    return f"{_fmt(mean)} [{_fmt(low)}, {_fmt(high)}]"


def _short(column: str, columns: Sequence[str]) -> str:
    """``sampler.params.fraction`` -> ``fraction`` unless another column ends the same way."""
    last = column.split(".")[-1]
    return last if sum(c.split(".")[-1] == last for c in columns) == 1 else column


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _MISSING
    return str(value).replace("|", "\\|")


def _subject_header(subjects: Sequence[str], extractors: Iterable[str]) -> str:
    """``extractor`` when every subject is an extractor id, ``extractor/universe`` when each is an
    extractor id and a universe tag (the auprc evaluator's keys), else ``subject``."""
    known = set(extractors)
    parts = [subject.split("/") for subject in subjects if subject]
    if parts and all(p[0] in known for p in parts):
        if all(len(p) == 1 for p in parts):
            return "extractor"
        if all(len(p) == 2 for p in parts):
            return "extractor/universe"
    return "subject"


def markdown_table(result: MetricTable, columns: Sequence[str], extractors: Iterable[str] = ()) -> str:
    table = result.table
    has_baseline = "baseline" in table and table["baseline"].notna().any()
    has_pearson = "pearson_mean" in table and table["pearson_mean"].notna().any()
    has_subject = (table["subject"] != "").any()
    header = [_short(c, columns) for c in columns]
    if has_subject:
        header.append(_subject_header(list(table["subject"]), extractors))
    header += ["n", f"mean [{CONFIDENCE:.0%} CI]"]
    if has_baseline:
        header += ["random", "× random"]
    if has_pearson:
        used = table.dropna(subset=["pearson_mean"])
        label = ", ".join(sorted(set(used["baseline_label"])))
        same = set(used["baseline_pairs"]) == {"same pairs"}
        header += [f"{label}{' (same pairs)' if same else ''} [{CONFIDENCE:.0%} CI]", f"÷ {label}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for _, row in table.iterrows():
        cells = [
            _MISSING if row.get(c) == ALL_CELLS and c != CELLS_COLUMN else _cell(row.get(c)) for c in columns
        ]
        if has_subject:
            cells.append(_cell(row["subject"]) if row["subject"] else _MISSING)
        cells += [str(int(row["n"])), _interval_text(row["mean"], row["low"], row["high"])]
        if has_baseline:
            baseline = row.get("baseline")
            ratio = (
                row["mean"] / baseline
                if baseline is not None and not pd.isna(baseline) and baseline
                else None
            )
            cells += [_fmt(baseline), _fmt(ratio)]
        if has_pearson:
            theirs = row.get("pearson_mean")
            cells.append(_interval_text(theirs, row.get("pearson_low"), row.get("pearson_high")))
            ratio = row.get("ratio_mean")
            paired = ratio is not None and not pd.isna(ratio) and not pd.isna(row.get("ratio_low"))
            text = _interval_text(ratio, row["ratio_low"], row["ratio_high"]) if paired else _fmt(ratio)
            ratio_n = row.get("ratio_n")
            if ratio_n is not None and not pd.isna(ratio_n) and int(ratio_n) < int(row["n"]):
                text = (
                    f"{_fmt(ratio)} (n = {int(ratio_n)})" if ratio_n <= 1 else f"{text} (n = {int(ratio_n)})"
                )
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- figures ------------------------------------------------------------------------------------


def choose_x(section: Section, x: str | None = None) -> str | None:
    """The group column for the figures' x axis: ``x`` when given, else one ending in ``fraction``,
    else the numeric group column with most values; None when no group column is numeric."""
    numeric = []
    for column in section.group_columns:
        values = [v for v in section.rows[column].dropna().unique() if v != ALL_CELLS]
        if len(values) > 1 and all(_number(v) is not None for v in values):
            numeric.append((len(values), column))
    if x is not None:
        if x not in [c for _, c in numeric]:
            raise GrnxError(
                f"--x {x!r} is not a numeric param that differs between the runs of recipe "
                f"{section.recipe!r}; numeric ones: {', '.join(c for _, c in numeric) or 'none'}."
            )
        return x
    for _, column in numeric:
        if column.split(".")[-1] == "fraction":
            return column
    return max(numeric)[1] if numeric else None


def metric_figure(result: MetricTable, section: Section, x: str) -> Any:
    """``metric`` against ``x``: a panel per subject and value of the other kinds of settings, a line
    per value of the settings of x's kind (x's first path segment), 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    table = result.table
    kind = x.split(".")[0]
    others = [c for c in section.group_columns if c != x]
    line_columns = [c for c in others if c.split(".")[0] == kind]
    panel_columns = [c for c in others if c.split(".")[0] != kind]
    sampled = table[table[x] != ALL_CELLS] if x in table else table
    reference = table[table[CELLS_COLUMN] == ALL_CELLS] if CELLS_COLUMN in table else table.iloc[:0]
    subjects = list(dict.fromkeys(sampled["subject"]))
    combos = list(dict.fromkeys(sampled[panel_columns].itertuples(index=False, name=None))) or [()]
    panels = [
        (subject, combo)
        for combo in combos
        for subject in subjects
        if _matches(sampled, panel_columns, combo, subject).any()
    ]
    if not panels:
        return None
    n_columns = len(subjects) if len(subjects) <= 6 else 4
    n_rows = math.ceil(len(panels) / n_columns)
    figure, axes = plt.subplots(
        n_rows, n_columns, figsize=(3.4 * n_columns, 2.9 * n_rows), squeeze=False, sharey=True
    )
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    for axis, (subject, combo) in zip(axes.flat, panels):
        frame = sampled[_matches(sampled, panel_columns, combo, subject)]
        frame = frame.assign(_x=frame[x].map(_number))
        lines = list(frame.groupby(line_columns, sort=False)) if line_columns else [((), frame)]
        for index, (key, line) in enumerate(lines):
            # Lines side by side, a little apart, so their error bars do not hide each other.
            shift = (index - (len(lines) - 1) / 2) * 0.025
            line = line.assign(_x=line["_x"] * math.exp(shift)).sort_values("_x")
            error = np.vstack([line["mean"] - line["low"], line["high"] - line["mean"]])
            label = ", ".join(str(v) for v in (key if isinstance(key, tuple) else (key,)))
            axis.errorbar(
                line["_x"],
                line["mean"],
                yerr=None if np.isnan(error).all() else error,
                marker="o",
                capsize=3,
                label=label or None,
            )
        if "baseline" in frame and frame["baseline"].notna().any():
            axis.axhline(float(frame["baseline"].mean()), color="grey", linestyle="--", linewidth=1)
        if len(reference):
            for value in reference[_matches(reference, panel_columns, combo, subject)]["mean"].dropna():
                axis.axhline(float(value), color="black", linestyle=":", linewidth=1)
        settings = [f"{_short(c, section.group_columns)}={v}" for c, v in zip(panel_columns, combo)]
        axis.set_title(", ".join([subject or result.metric, *settings]), fontsize=8)
        axis.set_xlabel(_short(x, section.group_columns))
        axis.grid(alpha=0.3)
        if _positive(frame["_x"]):
            axis.set_xscale("log")
        ticks = sorted(frame["_x"].dropna().unique())
        if 1 < len(ticks) <= 8:  # the swept values themselves, not the scale's round numbers
            axis.set_xticks(ticks, [f"{t:g}" for t in ticks])
            axis.minorticks_off()
    for axis in axes[:, 0]:
        axis.set_ylabel(f"{result.metric} (mean, {CONFIDENCE:.0%} CI)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    from matplotlib.lines import Line2D

    if "baseline" in sampled and sampled["baseline"].notna().any():
        handles.append(Line2D([], [], color="grey", linestyle="--"))
        labels.append("random")
    if len(reference):
        handles.append(Line2D([], [], color="black", linestyle=":"))
        labels.append("all cells (reference)")
    legend_height = 0.0
    if labels:
        n_legend_columns, n_legend_rows = legend_grid(labels, figure.get_figwidth())
        figure.legend(handles, labels, loc="lower center", ncol=n_legend_columns, fontsize=8, frameon=False)
        # each legend row takes ~0.2 in, plus room for the bottom axes' x label above it
        legend_height = min(0.5, (0.2 * n_legend_rows + 0.1) / figure.get_figheight())
    figure.suptitle(f"{result.evaluator}: {result.metric}", fontsize=10)
    figure.tight_layout(rect=(0, legend_height, 1, 0.95))
    return figure


def legend_grid(labels: Sequence[str], width_inches: float) -> tuple[int, int]:
    """(columns, rows) of a figure legend whose entries fit ``width_inches`` at font size 8: an
    entry takes its marker (~0.45 in) and ~0.065 in per character."""
    entry = 0.45 + 0.065 * max(len(label) for label in labels)
    columns = max(1, min(len(labels), int(width_inches // entry)))
    return columns, math.ceil(len(labels) / columns)


def _matches(table: pd.DataFrame, columns: Sequence[str], values: Sequence[Any], subject: str) -> pd.Series:
    mask = table["subject"] == subject
    for column, value in zip(columns, values):
        mask &= table[column].astype(str) == str(value)
    return mask


def _positive(values: pd.Series) -> bool:
    numbers = pd.to_numeric(values, errors="coerce").dropna()
    return len(numbers) > 1 and bool((numbers > 0).all()) and numbers.max() / numbers.min() >= 5


# -- the report ---------------------------------------------------------------------------------


@dataclass
class Report:
    """What ``write_report`` wrote."""

    path: Path
    tables: list[Path]
    figures: list[Path]
    sections: list[Section]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _run_line(run: Any) -> str:
    started = datetime.fromtimestamp((run.info.start_time or 0) / 1000, timezone.utc)
    version = run.data.tags.get("grnx.recipe_version")
    described = f"v{version}, " if version else ""
    return f"`{run.info.run_id}` ({described}{run.info.status}, started {started:%Y-%m-%d %H:%M} UTC)"


def _parent_aggregates(section: Section) -> pd.DataFrame:
    """What the parent runs logged beyond mean/std/n/reference of their leaves' metrics: a row per
    group and evaluator subject, a column per metric."""
    rows = []
    for run in section.top_runs:
        for name, value in sorted(run.data.metrics.items()):
            if name.endswith(_SUMMARY_SUFFIXES):
                continue
            group, key = "", name
            if name.startswith("sweep/"):
                _, group, key = name.split("/", 2)
            evaluator = key.split("/")[1] if key.count("/") >= 2 else ""
            parsed = parse_metric(key, _declares(section, evaluator))
            if parsed is None:
                continue
            rows.append(
                {
                    "group": group,
                    "evaluator": parsed.evaluator,
                    "subject": "/".join(parsed.subject),
                    "metric": parsed.metric,
                    "value": value,
                }
            )
    if not rows:
        return pd.DataFrame()
    long = pd.DataFrame(rows)
    wide = long.pivot_table(
        index=["group", "evaluator", "subject"], columns="metric", values="value", aggfunc="last", sort=False
    )
    return wide.reset_index()


def default_output(experiment: str) -> Path:
    return Path("reports") / _safe(experiment)


def _paths(out: Path | None, experiment: str) -> tuple[Path, Path]:
    """(markdown file, folder of its figures and tables)."""
    out = Path(out) if out is not None else default_output(experiment)
    if out.suffix.lower() == ".md":
        return out, out.with_suffix("")
    return out / "report.md", out


def write_report(
    tracker: Any,
    experiment: str,
    out: Path | None = None,
    *,
    metrics: Sequence[str] | None = None,
    x: str | None = None,
    repeat_params: Sequence[str] = REPEAT_PARAMS,
    confidence: float = CONFIDENCE,
    command: str | None = None,
    notes: Sequence[str] = (),
) -> Report:
    """Write the report of ``experiment``: ``out/report.md`` (or ``out`` itself when it ends in
    ``.md``, its figures and tables then in the folder of the same name without ``.md``), with
    ``figures/*.png`` and ``tables/*.csv`` (the numbers in full precision) beside it. ``command``
    (default: this process's ``grnx`` arguments) heads the report; ``notes`` are lines under it
    (e.g. the runs a benchmark driver started and their wall times).

    Every file is written to a temporary path and renamed into place; the figures and tables
    folders are replaced whole, so none is left over from an earlier report.
    """
    if not 0 < confidence < 1:
        raise GrnxError(f"the confidence level must be in (0, 1), got {confidence}.")
    runs = _runs(tracker, experiment)
    if not runs:
        raise GrnxError(f"experiment {experiment!r} has no runs yet; run a recipe into it first.")
    sections = sections_of(runs, repeat_params)
    report_path, assets = _paths(out, experiment)
    written_tables: list[Path] = []
    written_figures: list[Path] = []
    lines = [f"# {experiment}: report", ""]
    if command is None:
        command = "grnx " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    if command:
        lines += [f"Made by: `{command}`", ""]
    if notes:
        lines += [*notes, ""]
    from grnx_core import __version__

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines += [
        f"Read from the tracking store `{_display_uri(tracker.tracking_uri)}` by grnx {__version__} on {when}. "
        f"Each value is the mean over the runs of a group with its {confidence:.0%} Student t-interval "
        "(mean ± t·s/√n, n − 1 degrees of freedom); `n = 1` marks a single run. `random` is the "
        "evaluator's random baseline; `Pearson` the same metric of the `pearson` extractor in the same "
        "runs: over the extractor's own pairs where marked `(same pairs)` (with the mean of the per-run "
        "ratio and its interval), else over Pearson's own universe (same ground truth and universe rule; "
        "the ratio is then of the means).",
        "",
    ]
    tabulated = 0
    with (
        atomic_path(assets / "figures", directory=True) as figures_dir,
        atomic_path(assets / "tables", directory=True) as tables_dir,
    ):
        for section in sections:
            lines += _section_header(section)
            if not section.leaves:
                lines += ["No finished run to report.", ""]
                continue
            names = metric_names(section)
            chosen = _directed_metrics(section, names, metrics)
            x_column = choose_x(section, x) if chosen else None
            for evaluator, metric in chosen:
                result = metric_table(section, evaluator, metric, confidence)
                if result.table.empty:
                    continue
                tabulated += 1
                stem = _safe(f"{section.recipe}_{evaluator}_{metric}")
                csv = tables_dir / f"{stem}.csv"
                result.table.to_csv(csv, index=False)
                written_tables.append(assets / "tables" / csv.name)
                direction = ""
                if result.higher_is_better is not None:
                    direction = " (higher is better)" if result.higher_is_better else " (lower is better)"
                lines += [f"### {evaluator}: {metric}{direction}", ""]
                lines += [markdown_table(result, section.columns, section.extractors), ""]
                if x_column is not None:
                    figure = metric_figure(result, section, x_column)
                    if figure is not None:
                        png = figures_dir / f"{stem}_vs_{_safe(x_column.split('.')[-1])}.png"
                        figure.savefig(png, dpi=110)
                        import matplotlib.pyplot as plt

                        plt.close(figure)
                        final = assets / "figures" / png.name
                        written_figures.append(final)
                        relative = os.path.relpath(final, report_path.parent)
                        lines += [f"![{evaluator} {metric} against {x_column}]({relative})", ""]
                lines += [
                    f"Numbers: `{os.path.relpath(assets / 'tables' / csv.name, report_path.parent)}`.",
                    "",
                ]
            aggregates = _parent_aggregates(section)
            if len(aggregates):
                lines += _aggregates_lines(aggregates)
        # Raised inside the block: the folders of an earlier report stay as they were.
        if not tabulated:
            metric_list = sorted(
                {name for s in sections for name in s.rows.columns if str(name).startswith("eval/")}
            )
            raise GrnxError(
                f"no finished run of experiment {experiment!r} logged an evaluator metric to tabulate"
                + (f" matching {', '.join(metrics)}" if metrics else "")
                + f"; eval/ metrics logged: {', '.join(metric_list[:20]) or 'none'}. "
                "Add an evaluator to the recipe, or pick metrics with --metric."
            )
    write_text(report_path, "\n".join(lines).rstrip() + "\n")
    return Report(report_path, written_tables, written_figures, sections)


def _display_uri(uri: str) -> str:
    """A store inside the working directory as a relative path, so the report names no home folder."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        try:
            return "sqlite:///" + str(path.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return uri
    return uri


def _section_header(section: Section) -> list[str]:
    lines = [f"## Recipe `{section.recipe}`", ""]
    lines.append("Runs: " + "; ".join(_run_line(run) for run in section.top_runs) + ".")
    lines.append("")
    n_sampled = sum(1 for run in section.leaves if run.data.tags.get(ROLE_TAG) != REFERENCE_ROLE)
    parts = [f"{len(section.leaves)} finished leaf runs ({n_sampled} sampled"]
    parts[-1] += f", {len(section.leaves) - n_sampled} full-data reference)" if section.has_reference else ")"
    if section.superseded:
        parts.append(f"{section.superseded} earlier runs with the same params superseded by newer ones")
    if section.unfinished:
        statuses = pd.Series([run.info.status for run in section.unfinished]).value_counts()
        parts.append("not counted: " + ", ".join(f"{count} {status}" for status, count in statuses.items()))
    lines += ["; ".join(parts) + ".", ""]
    if section.group_columns:
        lines.append(
            "Grouped by the params that differ between the runs: "
            + ", ".join(f"`{c}`" for c in section.group_columns)
            + "."
        )
    else:
        lines.append(
            "The sampled runs differ in no param"
            + (" but the repeat seed" if section.repeat_values else "")
            + ": one group"
            + (" beside the full-data reference." if section.has_reference else ".")
        )
    for name, values in section.repeat_values.items():
        shown = ", ".join(values[:10]) + (", ..." if len(values) > 10 else "")
        lines.append(f"Repeats differ in `{name}` ({len(values)} values: {shown}).")
    if section.determined_columns:
        lines.append(
            "Also differ, but follow from the grouping: "
            + ", ".join(f"`{c}`" for c in section.determined_columns)
            + "."
        )
    counts = (
        section.rows.groupby(section.columns, dropna=False, sort=False).size()
        if section.columns and len(section.rows)
        else None
    )
    if counts is not None:
        sizes = sorted(set(counts.tolist()))
        lines.append(f"Runs per group: {', '.join(str(s) for s in sizes)} ({len(counts)} groups).")
    commits = sorted(
        {
            run.data.tags.get("grnx.git_commit")
            for run in section.top_runs
            if run.data.tags.get("grnx.git_commit")
        }
    )
    if commits:
        lines.append("Code: " + ", ".join(f"`{c}`" for c in commits) + ".")
    return [*lines, ""]


def _aggregates_lines(aggregates: pd.DataFrame) -> list[str]:
    metrics = [c for c in aggregates.columns if c not in ("group", "evaluator", "subject")]
    header = ["group", "evaluator", "subject", *metrics]
    lines = [
        "### Aggregates the parent runs logged",
        "",
        "Evaluators' own aggregates over the repeats of each group (e.g. the MSE of NES against the "
        "full data, top-k stability), as the parent run logged them: one value per group.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for _, row in aggregates.iterrows():
        cells = [_cell(row["group"]) if row["group"] else _MISSING, _cell(row["evaluator"])]
        cells.append(_cell(row["subject"]) if row["subject"] else _MISSING)
        cells += [_fmt(row[m]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


# -- for drivers that assemble their own documents (benchmarks/study_results.py) ------------------


def experiment_sections(
    tracker: Any, experiment: str, repeat_params: Sequence[str] = REPEAT_PARAMS
) -> list[Section]:
    """The sections ``write_report`` would write for ``experiment``: one per recipe, grouped.

    For a driver that puts chosen metric tables of several experiments into one document with
    ``metric_table``, ``markdown_table`` and ``metric_figure``; raises as ``write_report`` does when
    the experiment is unknown or has no runs.
    """
    runs = _runs(tracker, experiment)
    if not runs:
        raise GrnxError(f"experiment {experiment!r} has no runs yet; run a recipe into it first.")
    return sections_of(runs, repeat_params)


def parent_aggregates(section: Section) -> pd.DataFrame:
    """What the parent runs of ``section`` logged beyond their leaves' summaries (e.g. NES MSE
    against the full data): a row per group, evaluator and subject, a column per metric; empty when
    none. The table ``write_report`` lists under "Aggregates the parent runs logged"."""
    return _parent_aggregates(section)


def format_value(value: Any) -> str:
    """A number as the report's tables show it (``—`` for a missing value)."""
    return _fmt(value)
