"""``grnx compare``: one experiment's runs side by side: the params that differ and the key metrics.

Runs are read from the tracking store through :class:`grnx_core.tracking.Tracker`. Each top-level
run is followed by its nested runs (sweep points, repeats, tuning trials), indented, in the order
they started. A param is shown when its value is not the same in every run listed (a run without
it counts as a different value); metrics are those named with ``--metric`` (``*`` matches any
text, e.g. ``eval/*/macro_f1``), else every ``eval/`` metric and the ``tune/`` summary of a tune,
random baselines left out.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any

import pandas as pd

from grnx_core.errors import GrnxError

PARENT_TAG = "mlflow.parentRunId"
#: Metrics that describe the baseline or the problem, not the run's result.
_BASELINE_SUFFIXES = ("_random", "_best", "/n_candidates", "/extractor_genes")
MAX_DEFAULT_METRICS = 12
RUN_COLUMNS = ("run", "run_id", "status")


def _runs(tracker: Any, experiment: str) -> list[Any]:
    found = tracker.client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in tracker.client.search_experiments(max_results=1000)]
        close = difflib.get_close_matches(experiment, names, n=1)
        suggestion = f" Did you mean {close[0]!r}?" if close else ""
        raise GrnxError(
            f"no experiment {experiment!r} in the tracking store {tracker.tracking_uri}.{suggestion} "
            f"Experiments: {', '.join(sorted(names)) or 'none'}."
        )
    runs: list[Any] = []
    token = None
    while True:
        page = tracker.client.search_runs(
            [found.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _ordered(runs: list[Any]) -> list[tuple[int, Any]]:
    """(depth, run): newest top-level run first, each followed by its children in start order."""
    ids = {run.info.run_id for run in runs}
    children: dict[str | None, list[Any]] = {}
    for run in runs:
        parent = run.data.tags.get(PARENT_TAG)
        children.setdefault(parent if parent in ids else None, []).append(run)
    ordered: list[tuple[int, Any]] = []

    def walk(run: Any, depth: int) -> None:
        ordered.append((depth, run))
        for child in children.get(run.info.run_id, []):
            walk(child, depth + 1)

    for top in reversed(children.get(None, [])):
        walk(top, 0)
    return ordered


def _metric_names(runs: list[Any], patterns: list[str] | None) -> list[str]:
    names = sorted({name for run in runs for name in run.data.metrics})
    if patterns:
        chosen = [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
        if not chosen:
            raise GrnxError(
                f"no run of the experiment logged a metric matching {', '.join(patterns)}; logged: "
                f"{', '.join(names[:30]) or 'none'}{', ...' if len(names) > 30 else ''}."
            )
        return chosen
    key = [
        name
        for name in names
        if (name.startswith("eval/") or name.startswith("tune/best/") or name.startswith("tune/held_out/"))
        and not name.endswith(_BASELINE_SUFFIXES)
    ]
    return key[:MAX_DEFAULT_METRICS]


def set_params(run: Any) -> dict[str, str]:
    """A run's params less those logged as null: a setting added to grnx later, with a None default,
    is absent from the runs made before it and null in those after, which mean the same."""
    return {name: value for name, value in run.data.params.items() if value != "null"}


def _differing_params(runs: list[Any]) -> list[str]:
    params = [set_params(run) for run in runs]
    names = sorted({name for p in params for name in p})
    return [name for name in names if len({p.get(name) for p in params}) > 1]


def compare_table(tracker: Any, experiment: str, metrics: list[str] | None = None) -> pd.DataFrame:
    """A row per run of ``experiment``: name (children indented), id, status, differing params, metrics."""
    runs = _runs(tracker, experiment)
    if not runs:
        raise GrnxError(f"experiment {experiment!r} has no runs yet.")
    ordered = _ordered(runs)
    params = _differing_params(runs)
    metric_names = _metric_names(runs, metrics)
    rows = []
    for depth, run in ordered:
        name = run.info.run_name or run.info.run_id
        row: dict[str, Any] = {
            "run": ("  " * (depth - 1) + "└ " if depth else "") + name,
            "run_id": run.info.run_id,
            "status": run.info.status,
            "parent_run_id": run.data.tags.get(PARENT_TAG, ""),
        }
        row.update({name: run.data.params.get(name) for name in params})
        row.update({name: run.data.metrics.get(name) for name in metric_names})
        rows.append(row)
    return pd.DataFrame(rows, columns=[*RUN_COLUMNS, "parent_run_id", *params, *metric_names])


def format_table(table: pd.DataFrame, max_width: int = 40) -> str:
    """The table as aligned text: numbers to 4 significant digits, long values shortened for the
    terminal (the CSV keeps them whole)."""
    shown = table.drop(columns=["parent_run_id"])

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return "-"
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    header = [str(column) for column in shown.columns]
    body = [[cell(value) for value in row] for row in shown.itertuples(index=False)]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip() for row in [header, *body]
    ]
    return "\n".join(lines)
