"""Tuning: a Ray Tune + hyperopt search over recipe paths, each trial a nested MLflow run.

A recipe's ``tune`` block names a search space (recipe path -> distribution), the metric to
optimise and how many trials to run. Each trial is a child recipe (the recipe with the sampled
paths set, validated like any recipe) that runs through the ordinary :class:`~grnx_core.runner.Runner`.

Where things run, and why the store stays whole: trials run in Ray workers (several at once with
``max_concurrent``), but nothing in a worker opens the MLflow store. A worker's runner logs into a
:class:`RecordingTracker`, which writes every param, metric, tag and artifact down in a folder and
sends each per-epoch metric to Ray (``tune.report``), so ASHA can stop a bad trial early. The
folder goes back to the driver as the trial's final Ray checkpoint. The driver, a single process,
is the only writer to the store: a Ray callback opens each trial's nested run when it starts, logs
its epochs as they arrive and replays its record when it ends. SQLite never sees two writers, and
a tune on a Ray cluster (``execution.ray_address``) needs no tracking server reachable from the
workers.

The parent run holds the resolved recipe, the best trial's values (params ``tune.best.<path>``),
its metric (``tune/best/<metric>``), a table and a figure of the metric per trial. With
``ground_truth_split`` trials are scored on one part of the ground-truth pairs and the best trial
is run again, as a nested run, on the other part (``tune/held_out/<metric>``).

An interrupted tune resumes: the parent run is found by the tag ``grnx.tune.id`` (a digest of the
recipe), and Ray's ``Tuner.restore`` continues from the tune's state in ``<cache>/tune/<id>``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from grnx_core import __version__
from grnx_core.errors import DataError, GrnxError, Problem, RecipeError
from grnx_core.ray_connect import init_ray
from grnx_core.recipe import (
    LoadedRecipe,
    Origins,
    ResolvedRecipe,
    TuneSpec,
    apply_override,
    flatten,
    validate_recipe,
)
from grnx_core.stage_log import FILES_FOLDER

log = logging.getLogger("grnx")

#: Tag of a tune's parent run and its trials: the digest that finds an interrupted tune again.
TUNE_ID_TAG = "grnx.tune.id"
#: Tag of a trial's nested run: Ray's trial id.
TRIAL_ID_TAG = "grnx.tune.trial_id"
TRIAL_NUMBER_TAG = "grnx.tune.trial"

# Keys of the results a trial reports to Ray, besides its metrics.
_EPOCH = "grnx_epoch"  # count of per-epoch reports: ASHA's time attribute
_STEP = "grnx_step"  # the step the metrics were logged with
_RUN = "grnx_run"  # which recorded run logged them ("r0": the trial's own run)
_LOGGED = "grnx_metrics"  # JSON list of the metric names of this report
_DONE = "grnx_done"  # the final report, with the trial's record as its checkpoint
_EPOCHS = "grnx_epochs"  # the final report: how many per-epoch reports came before it
_TOP_RUN = "r0"

RECORD_FILE = "record.json"


# ---------------------------------------------------------------------------------------------
# Trial recipes
# ---------------------------------------------------------------------------------------------


def tune_id(resolved: ResolvedRecipe) -> str:
    """A digest of the resolved recipe, without ``execution`` (where a tune runs is not what it is)."""
    data = resolved.to_dict()
    data.pop("execution", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _ground_truth_evaluators(resolved: ResolvedRecipe) -> list[int]:
    """Indices of the evaluators whose ground truth can be split (a ``ground_truth.edge_split`` field)."""
    found = []
    for index, step in enumerate(resolved.steps_of("evaluators")):
        truth = getattr(step.params, "ground_truth", None)
        if truth is not None and "edge_split" in getattr(type(truth), "model_fields", {}):
            found.append(index)
    return found


@dataclass
class TrialJob:
    """What a trial needs to build its recipe, in plain data: it travels to Ray workers."""

    data: dict[str, Any]
    path: str
    given_text: str
    overrides: list[str]
    origins: Origins
    spec: TuneSpec
    split_evaluators: list[int]
    cache_root: str | None = None
    cache_enabled: bool = True
    cwd: str | None = None

    @classmethod
    def of(cls, resolved: ResolvedRecipe) -> TrialJob:
        spec = resolved.recipe.tune
        if spec is None:
            raise GrnxError(f"recipe {resolved.recipe.name!r} has no tune block.")
        if resolved.source is not None:
            loaded = resolved.source
            data = copy.deepcopy(loaded.data)
            path, text, overrides, origins = (
                str(loaded.path),
                loaded.given_text,
                loaded.overrides,
                loaded.origins,
            )
        else:
            data, path, text, overrides, origins = (
                resolved.to_dict(),
                f"<{resolved.recipe.name}>",
                "",
                [],
                Origins(),
            )
        data.pop("tune", None)
        # A trial runs inside a Ray worker that holds its resources_per_trial and no more. With
        # execution.num_workers > 1 its steps send chunks to the num_workers - 1 slots reserved for
        # it (trial_resources); otherwise they run in the trial's own process: Ray would refuse
        # their tasks, and the tune already spreads the trials over the CPUs.
        execution = data.setdefault("execution", {}) or {}
        data["execution"] = execution
        if (execution.get("num_workers") or 1) <= 1:
            execution["num_workers"] = 1
            execution["ray_address"] = None
        splits = _ground_truth_evaluators(resolved) if spec.ground_truth_split is not None else []
        return cls(data, path, text, list(overrides), origins, spec, splits)

    def settings(self, config: dict[str, Any]) -> dict[str, Any]:
        """Ray's sampled ``config`` as recipe values (integers where the axis is integral)."""
        settings = {}
        for path, dimension in self.spec.space.items():
            value = config[path]
            if dimension.type == "randint" or (
                dimension.type == "quniform" and isinstance(dimension.extremes()[0], int)
            ):
                value = int(round(value))
            settings[path] = _plain(value)
        return settings

    def recipe(self, settings: dict[str, Any], part: str = "tune", registry: Any = None) -> ResolvedRecipe:
        """The trial's recipe: ``settings`` applied (and the ground-truth ``part``), validated."""
        from grnx_core.registry import default_registry

        values = dict(settings)
        split = self.spec.ground_truth_split
        if split is not None:
            for index in self.split_evaluators:
                values[f"evaluators.{index}.params.ground_truth.edge_split"] = {
                    "part": part,
                    "fraction": split.fraction,
                    "seed": split.seed,
                }
        data = copy.deepcopy(self.data)
        origins = Origins(dict(self.origins.by_path), dict(self.origins.override_paths))
        overrides = list(self.overrides)
        for path, value in values.items():
            try:
                apply_override(data, path.split("."), value)
            except ValueError as error:
                raise RecipeError(
                    [
                        Problem(
                            f"tune.space.{path}",
                            f"cannot set {path}: {error}",
                            source=self.origins.of("tune"),
                        )
                    ]
                ) from None
            origins.override_paths[path] = f"tune: {path}={value!r}"
            overrides.append(f"{path}={value!r}")
        loaded = LoadedRecipe(Path(self.path), data, self.given_text, overrides, origins)
        return validate_recipe(loaded, registry or default_registry())


def _plain(value: Any) -> Any:
    """Recipe data from a searcher's value: numpy scalars as numbers, tuples (Ray's choice of a
    list) as lists."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value.item() if hasattr(value, "item") else value


def describe_settings(settings: dict[str, Any]) -> str:
    """``learning_rate=3.2e-05, scheduler=cosine``: a trial's values, by the last part of each path."""
    parts = []
    for path, value in settings.items():
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(f"{path.split('.')[-1]}={shown}")
    return ", ".join(parts)


def validate_tune(resolved: ResolvedRecipe) -> None:
    """Check a recipe's ``tune`` block against the recipe; raise once with every problem.

    Every axis of the space is tried at its edges (each value of a choice), the others at their
    first edge, and each such trial recipe is validated; the metric must come from a stage of the
    recipe; ASHA needs a model (its per-epoch metrics); a ground-truth split needs an evaluator
    with a ground truth.
    """
    spec = resolved.recipe.tune
    if spec is None:
        return
    origins = resolved.source.origins if resolved.source is not None else Origins()
    problems: list[Problem] = []

    def problem(path: str, message: str, hint: str = "") -> None:
        problems.append(Problem(path, message, source=origins.of(path), hint=hint))

    recipe = resolved.recipe
    if recipe.sweep is not None:
        problem("tune", "a recipe has either a sweep or a tune, not both", "Remove one of them.")
    evaluator_ids = [step.step_id for step in resolved.steps_of("evaluators")]
    head, _, rest = spec.metric.partition("/")
    if head == "eval":
        evaluator = rest.split("/", 1)[0]
        if evaluator not in evaluator_ids:
            problem(
                "tune.metric",
                f"{spec.metric!r} is a metric of evaluator {evaluator!r}, which the recipe does not have "
                f"(evaluators: {', '.join(evaluator_ids) or 'none'})",
                "Name a metric as eval/<evaluator id>/<metric>, e.g. eval/classification/macro_f1.",
            )
    elif head in ("train", "pretrain") and recipe.model is None:
        problem("tune.metric", f"{spec.metric!r} is a training metric, but the recipe has no model")
    if spec.scheduler.type == "asha" and recipe.model is None:
        problem(
            "tune.scheduler",
            "ASHA stops trials on their per-epoch metrics, which only a model's training logs; the recipe "
            "has no model",
            "Use scheduler: none.",
        )
    splits = _ground_truth_evaluators(resolved)
    if spec.ground_truth_split is not None:
        if not splits:
            problem(
                "tune.ground_truth_split",
                "no evaluator of the recipe scores against a ground truth, so there is nothing to split",
                "Add an evaluator with a ground_truth (auprc, nes), or remove ground_truth_split.",
            )
        steps = resolved.steps_of("evaluators")
        for index in splits:
            if steps[index].params.ground_truth.edge_split is not None:  # type: ignore[attr-defined]
                problem(
                    f"evaluators.{index}.params.ground_truth.edge_split",
                    "is set, but the tune's ground_truth_split sets it for every trial",
                    "Remove one of them.",
                )
        if head == "eval":
            evaluator = rest.split("/", 1)[0]
            with_truth = {steps[index].step_id for index in splits}
            if evaluator in evaluator_ids and evaluator not in with_truth:
                problem(
                    "tune.metric",
                    f"comes from evaluator {evaluator!r}, which has no ground truth to split, so the "
                    "held-out report would repeat the tuned number",
                    "Tune a ground-truth metric (e.g. eval/auprc/<extractor>/truth_genes/epr) or remove ground_truth_split.",
                )
    if problems:
        raise RecipeError(problems)

    job = TrialJob.of(resolved)
    registry = resolved.registry
    first = {path: dimension.extremes()[0] for path, dimension in spec.space.items()}
    points = [first]
    for path, dimension in spec.space.items():
        points.extend({**first, path: value} for value in dimension.extremes()[1:])
    seen: set[str] = set()
    for point in points:
        key = json.dumps(point, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            job.recipe(point, registry=registry)
        except RecipeError as error:
            for found in error.problems:
                problems.append(
                    Problem(found.path, f"{found.message} (tune point {point})", found.source, found.hint)
                )
    if problems:
        raise RecipeError(problems)


# ---------------------------------------------------------------------------------------------
# In a worker: record the trial's runs
# ---------------------------------------------------------------------------------------------


class RecordedRun:
    """A run of a trial, written down instead of logged: a ``RunLogger`` with ``end``."""

    artifact_uri = None

    def __init__(
        self, tracker: RecordingTracker, run_id: str, parent: str | None, name: str, tags: dict
    ) -> None:
        self.tracker, self.run_id = tracker, run_id
        self.folder = tracker.folder / "runs" / run_id
        self.record: dict[str, Any] = {
            "id": run_id,
            "parent": parent,
            "name": name,
            "tags": {str(k): str(v) for k, v in tags.items()},
            "events": [],
            "status": "RUNNING",
        }

    def log_params(self, params: dict[str, Any]) -> None:
        self.record["events"].append({"params": json.loads(json.dumps(params, default=str))})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {str(k): float(v) for k, v in metrics.items()}
        self.record["events"].append({"metrics": clean, "step": step})
        if step is not None and self.tracker.on_step is not None:
            self.tracker.on_step(self.run_id, clean, step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.record["events"].append({"tags": {str(k): str(v) for k, v in tags.items()}})

    def _file(self, name: str) -> Path:
        file = self.folder / FILES_FOLDER / name
        file.parent.mkdir(parents=True, exist_ok=True)
        return file

    def _artifact(self, name: str) -> None:
        parent = str(Path(name).parent)
        self.record["events"].append({"artifact": name, "artifact_path": None if parent == "." else parent})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        name = f"{artifact_path}/{path.name}" if artifact_path else path.name
        if path.is_dir():
            shutil.copytree(path, self._file(name), dirs_exist_ok=True)
        else:
            shutil.copyfile(path, self._file(name))
        self._artifact(name)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._file(artifact_file).write_text(text, encoding="utf-8")
        self._artifact(artifact_file)

    def log_figure(self, name: str, figure: Any) -> None:
        import matplotlib.pyplot as plt

        name = name if name.endswith(".png") else name + ".png"
        figure.savefig(self._file(name), dpi=120, bbox_inches="tight")
        plt.close(figure)
        self._artifact(name)

    def log_table(self, name: str, table: pd.DataFrame) -> None:
        name = name if name.endswith(".csv") else name + ".csv"
        table.to_csv(self._file(name), index=False)
        self._artifact(name)

    def end(self, status: str = "FINISHED") -> None:
        self.record["status"] = status


class RecordingTracker:
    """The tracker a trial's runner logs into inside a Ray worker: it writes runs down in ``folder``.

    ``on_step(run_id, metrics, step)`` receives every metric logged with a step (the training
    loop's epochs), as they come.
    """

    tracking_uri = None

    def __init__(
        self, folder: Path, on_step: Callable[[str, dict[str, float], int], None] | None = None
    ) -> None:
        self.folder = Path(folder)
        self.on_step = on_step
        self.runs: list[RecordedRun] = []

    def start_run(
        self, experiment: str, run_name: str, tags: dict[str, str] | None = None, parent: Any = None
    ) -> RecordedRun:
        run = RecordedRun(
            self, f"r{len(self.runs)}", getattr(parent, "run_id", None), run_name, dict(tags or {})
        )
        self.runs.append(run)
        return run

    def fail_orphaned_runs(self, found_by: str | None = None) -> list[str]:
        return []  # the driver's store, not a worker, finds runs of killed processes

    def save(self) -> None:
        (self.folder / RECORD_FILE).write_text(
            json.dumps([run.record for run in self.runs]), encoding="utf-8"
        )


def replay_record(folder: Path, tracker: Any, trial_run: Any, skip_stepped: bool = True) -> str:
    """Log a trial's record (``folder``, written by :class:`RecordingTracker`) to the store.

    The trial's own run is logged into ``trial_run``; runs it started (repeats of a trial) become
    nested runs under it. ``skip_stepped`` leaves out the trial run's per-epoch metrics, which the
    driver logged as they arrived. Returns the status the trial's run ended with.
    """
    from grnx_core.stage_log import replay_events

    runs = json.loads((Path(folder) / RECORD_FILE).read_text(encoding="utf-8"))
    opened: dict[str, Any] = {}
    status = "FINISHED"
    experiment = tracker.client.get_experiment(tracker.experiment_id_of_run(trial_run.run_id)).name
    for record in runs:
        if record["parent"] is None:
            run = trial_run
            status = record["status"]
        else:
            parent = opened.get(record["parent"], trial_run)
            run = tracker.start_run(experiment, record["name"], record["tags"], parent=parent)
        opened[record["id"]] = run
        events = []
        for event in record["events"]:
            if "params" in event:
                run.log_params(event["params"])
            elif not (skip_stepped and run is trial_run and "metrics" in event and event["step"] is not None):
                events.append(event)
        if run is not trial_run:
            run.set_tags(record["tags"])
        replay_events(events, Path(folder) / "runs" / record["id"], run)
        if run is not trial_run:
            run.end(record["status"])
    return status


# ---------------------------------------------------------------------------------------------
# In a worker: one trial
# ---------------------------------------------------------------------------------------------


def run_trial(config: dict[str, Any], job: TrialJob) -> None:
    """Ray Tune's trainable: run one trial's recipe, report its epochs and its record."""
    from ray import tune

    from grnx_core.cache import Cache
    from grnx_core.registry import default_registry
    from grnx_core.runner import Runner

    if job.cwd is not None and Path(job.cwd).is_dir():
        os.chdir(job.cwd)  # relative paths in recipes resolve from where grnx was started
    resolved = job.recipe(job.settings(config))
    epochs = 0

    def report_epoch(run_id: str, metrics: dict[str, float], step: int) -> None:
        nonlocal epochs
        epochs += 1
        tune.report(
            {**metrics, _EPOCH: epochs, _STEP: step, _RUN: run_id, _LOGGED: json.dumps(list(metrics))}
        )

    with tempfile.TemporaryDirectory(prefix="grnx-trial-") as scratch:
        tracker = RecordingTracker(Path(scratch), on_step=report_epoch)
        cache = Cache(Path(job.cache_root) if job.cache_root else None, enabled=job.cache_enabled)
        runner = Runner(
            resolved, tracker=tracker, cache=cache, plugin_manager=default_registry().plugin_manager
        )
        result = runner.run()
        metric = job.spec.metric
        if metric not in result.metrics:
            raise DataError(
                f"tune.metric {metric!r} was not logged by the trial; it logged "
                f"{', '.join(sorted(result.metrics)[:30]) or 'no metrics'}. Set tune.metric to one of them."
            )
        tracker.save()
        final = {key: value for key, value in result.metrics.items() if _finite(value)}
        # No _EPOCH here: ASHA would read the final report as one more epoch.
        tune.report({**final, _DONE: 1, _EPOCHS: epochs}, checkpoint=tune.Checkpoint.from_directory(scratch))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))


# ---------------------------------------------------------------------------------------------
# In the driver: the trials' nested runs
# ---------------------------------------------------------------------------------------------


@dataclass
class TrialOutcome:
    """One trial as the parent run reports it."""

    number: int
    trial_id: str
    settings: dict[str, Any]
    status: str  # finished, stopped (by the scheduler), failed
    value: float | None = None
    epochs: int = 0
    run_id: str | None = None
    error: str | None = None


class _TrialLog:
    """The driver's side of a tune: opens, fills and ends each trial's nested run."""

    def __init__(
        self, job: TrialJob, tracker: Any, parent: Any, experiment: str, run_name: str, tune_key: str
    ) -> None:
        self.job, self.tracker, self.parent = job, tracker, parent
        self.experiment, self.run_name, self.tune_key = experiment, run_name, tune_key
        self.runs: dict[str, Any] = {}
        self.epochs: dict[str, int] = {}

    def started(self, trial: Any) -> None:
        self.epochs[trial.trial_id] = 0
        if self.tracker is None:
            return
        settings = self.job.settings(trial.config)
        number = trial_number(trial)
        tags = {
            "grnx.recipe": self.job.data.get("name", ""),
            "grnx.child": "trial",
            "grnx.version": __version__,
            TUNE_ID_TAG: self.tune_key,
            TRIAL_ID_TAG: trial.trial_id,
            TRIAL_NUMBER_TAG: str(number),
        }
        run = self.tracker.start_run(
            self.experiment,
            f"{self.run_name}: trial {number} ({describe_settings(settings)})",
            tags,
            parent=self.parent,
        )
        run.log_params(flatten(self.job.recipe(settings).to_dict()))
        self.runs[trial.trial_id] = run

    def result(self, trial: Any, result: dict[str, Any]) -> None:
        if _EPOCH not in result:
            return
        self.epochs[trial.trial_id] = int(result[_EPOCH])
        run = self.runs.get(trial.trial_id)
        if run is None or result.get(_RUN) != _TOP_RUN:
            return
        names = json.loads(result[_LOGGED])
        run.log_metrics({name: result[name] for name in names if name in result}, step=int(result[_STEP]))

    def completed(self, trial: Any) -> None:
        run = self.runs.pop(trial.trial_id, None)
        if run is None:
            return
        last = trial.last_result or {}
        if last.get(_DONE) and trial.checkpoint is not None:
            with trial.checkpoint.as_directory() as folder:
                status = replay_record(Path(folder), self.tracker, run)
            run.end(status)
            return
        scheduler = self.job.spec.scheduler
        value = last.get(scheduler.metric)
        shown = f" ({scheduler.metric} {value:.4g})" if isinstance(value, (int, float)) else ""
        run.set_tags(
            {
                "grnx.tune.stopped": f"stopped early by the {scheduler.type} scheduler after "
                f"{self.epochs.get(trial.trial_id, 0)} epochs{shown}"
            }
        )
        run.end("KILLED")

    def failed(self, trial: Any) -> None:
        run = self.runs.pop(trial.trial_id, None)
        if run is None:
            return
        error = _trial_error(trial)
        run.set_tags({"grnx.error": error, "grnx.error_type": error.split(":", 1)[0]})
        run.end("FAILED")


def trial_number(trial: Any) -> int:
    """Ray's 1-based index of a trial in its tune (the start of its experiment tag), kept on restore."""
    tag = str(getattr(trial, "experiment_tag", "") or "")
    head = tag.split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def _trial_error(trial: Any) -> str:
    """The last line of a failed trial's traceback (``ErrorType: message``)."""
    path = getattr(trial, "error_file", None)
    text = ""
    with contextlib.suppress(OSError, TypeError):
        if path:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "the trial failed (no error recorded)"


#: Driver-side logs of the tunes running in this process, by tune id. Ray pickles the callback
#: with the tune's state and restores it on resume; the callback holds only the id.
_TRIAL_LOGS: dict[str, _TrialLog] = {}


def _callback(key: str) -> Any:
    from ray import tune

    class GrnxTrialRuns(tune.Callback):
        """Logs each trial as a nested MLflow run of the tune's parent run, from the driver."""

        def __init__(self, key: str) -> None:
            self.key = key

        def _log(self) -> _TrialLog | None:
            return _TRIAL_LOGS.get(self.key)

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if (log_ := self._log()) is not None:
                log_.started(trial)

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            if (log_ := self._log()) is not None:
                log_.result(trial, result)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if (log_ := self._log()) is not None:
                log_.completed(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if (log_ := self._log()) is not None:
                log_.failed(trial)

    return GrnxTrialRuns(key)


def _searcher(spec: TuneSpec, seed: int) -> Any:
    from ray.tune.search.hyperopt import HyperOptSearch

    class StoppedTrialsFailSearch(HyperOptSearch):
        """HyperOptSearch told that a trial the scheduler stopped failed: it has no final metric to
        learn from (hyperopt would otherwise raise on it)."""

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if not error and (result is None or self.metric not in result):
                error = True
            super().on_trial_complete(trial_id, result=result, error=error)

    return StoppedTrialsFailSearch(
        metric=spec.metric, mode=spec.mode, n_initial_points=spec.initial_points, random_state_seed=seed
    )


def search_space(spec: TuneSpec) -> dict[str, Any]:
    """The ``tune`` block's space as Ray Tune domains (randint's ``high`` is included)."""
    from ray import tune

    space = {}
    for path, dimension in spec.space.items():
        if dimension.type == "choice":
            space[path] = tune.choice(list(dimension.values or []))
            continue
        assert dimension.low is not None and dimension.high is not None
        low, high = float(dimension.low), float(dimension.high)
        if dimension.type == "loguniform":
            space[path] = tune.loguniform(low, high)
        elif dimension.type == "uniform":
            space[path] = tune.uniform(low, high)
        elif dimension.type == "quniform":
            space[path] = tune.quniform(low, high, float(dimension.q or 1.0))
        else:
            space[path] = tune.randint(int(low), int(high) + 1)
    return space


def _scheduler(spec: TuneSpec, epochs: int) -> Any:
    if spec.scheduler.type == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    settings = spec.scheduler
    return ASHAScheduler(
        time_attr=_EPOCH,
        metric=settings.metric,
        mode=settings.mode,
        max_t=settings.max_t or max(epochs, settings.grace_period + 1),
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
        stop_last_trials=False,  # a trial that reaches max_t finishes: its final report has the metric
    )


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None) -> Iterator[None]:
    """Ray for the tune: the one already started in this process, an existing cluster at
    ``address``, or a local Ray with ``num_cpus`` (all local CPUs when None), shut down after."""
    import ray

    if ray.is_initialized():
        yield
        return
    init_ray(address, num_cpus or os.cpu_count() or 1, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def trial_resources(spec: TuneSpec, num_workers: int | None) -> Any:
    """What each trial holds: ``resources_per_trial``, and with ``execution.num_workers`` > 1 one
    more CPU slot per extra worker, where its steps' Ray tasks (attention chunks, GRNBoost2 targets)
    run; the trial's own CPU counts as the first worker."""
    from ray import tune

    own = {"CPU": spec.resources_per_trial.cpu, "GPU": spec.resources_per_trial.gpu}
    if not num_workers or num_workers <= 1:
        return {"cpu": own["CPU"], "gpu": own["GPU"]}
    return tune.PlacementGroupFactory([own] + [{"CPU": 1.0}] * (num_workers - 1))


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------------------------------------
# The tune
# ---------------------------------------------------------------------------------------------


@dataclass
class TuneResult:
    """What a tune produced: its parent run, every trial, the best one and the parent's metrics."""

    run_id: str | None
    status: str
    trials: list[TrialOutcome] = field(default_factory=list)
    best: TrialOutcome | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    held_out: dict[str, float] = field(default_factory=dict)
    held_out_run_id: str | None = None
    resumed: bool = False
    storage: Path | None = None


def _tags(resolved: ResolvedRecipe, key: str) -> dict[str, str]:
    from grnx_core.tracking import git_commit

    recipe = resolved.recipe
    tags = {
        "grnx.recipe": recipe.name,
        "grnx.recipe_version": str(recipe.version),
        "grnx.version": __version__,
        "grnx.child": "tune",
        TUNE_ID_TAG: key,
        **recipe.tracking.tags,
    }
    if resolved.source is not None:
        tags["grnx.recipe_path"] = str(resolved.source.path)
        tags["grnx.overrides"] = json.dumps(resolved.source.overrides)
    commit = git_commit()
    if commit:
        tags["grnx.git_commit"] = commit
    return tags


def _unfinished_parent(tracker: Any, experiment: str, key: str) -> Any:
    """The parent run of an interrupted tune ``key`` (FAILED or KILLED), or None.

    A parent still RUNNING after ``fail_orphaned_runs`` belongs to a live process: refused.
    """
    from grnx_core.tracking import TrackedRun

    runs = tracker.client.search_runs(
        [tracker.experiment_id(experiment)],
        filter_string=f"tags.`{TUNE_ID_TAG}` = '{key}' and tags.`grnx.child` = 'tune'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    latest = runs[0]
    status = latest.info.status
    if status == "RUNNING":
        tags = latest.data.tags
        raise GrnxError(
            f"this tune is already running (run {latest.info.run_id}, process {tags.get('grnx.pid', '?')} on "
            f"{tags.get('grnx.host', '?')}). Wait for it to finish, or stop that process and rerun to resume."
        )
    if status == "FINISHED":
        return None
    return TrackedRun(tracker, latest.info.run_id)


def _reopen(tracker: Any, run: Any) -> None:
    """Mark a parent RUNNING again, owned by this process, without the error of its interruption."""
    from grnx_core.tracking import _owner_tags

    tracker.client.update_run(run.run_id, status="RUNNING")
    tags = tracker.client.get_run(run.run_id).data.tags
    for stale in ("grnx.error", "grnx.error_type"):
        if stale in tags:
            tracker.client.delete_tag(run.run_id, stale)
    resumed = int(tags.get("grnx.tune.resumed", "0")) + 1
    run.set_tags({**_owner_tags(), "grnx.tune.resumed": str(resumed)})


def run_tune(
    resolved: ResolvedRecipe,
    *,
    tracking_uri: str | None = None,
    track: bool = True,
    cache: Any = None,
    ray_address: str | None = None,
    show_progress: bool = False,
) -> TuneResult:
    """Run the recipe's tune: every trial a nested run of one parent run (see the module docstring)."""
    from ray import tune

    from grnx_core import progress
    from grnx_core.cache import Cache
    from grnx_core.runner import _log_recipe, describe_run

    spec = resolved.recipe.tune
    if spec is None:
        raise GrnxError(f"recipe {resolved.recipe.name!r} has no tune block; run it with `grnx run`.")
    validate_tune(resolved)
    recipe = resolved.recipe
    cache = cache if cache is not None else Cache(enabled=recipe.cache)
    key = tune_id(resolved)
    storage_root = Path(cache.root).absolute() / "tune"
    storage = storage_root / key
    job = TrialJob.of(resolved)
    job.cache_root, job.cache_enabled, job.cwd = str(Path(cache.root).absolute()), cache.enabled, os.getcwd()
    experiment = recipe.tracking.experiment
    run_name = recipe.tracking.run_name or (
        describe_run(recipe, resolved.source.overrides if resolved.source else [])
        + f" · tune {spec.num_samples} trials"
    )

    def say(message: str) -> None:
        if show_progress:
            progress.say(f"[grnx] {message}")

    tracker = parent = None
    resumed = False
    if track:
        from grnx_core.tracking import Tracker

        tracker = Tracker(tracking_uri)
        tracker.fail_orphaned_runs()
        parent = _unfinished_parent(tracker, experiment, key)
        if parent is not None:
            _reopen(tracker, parent)
            resumed = True
            say(f"resuming the interrupted tune of run {parent.run_id}")
        else:
            parent = tracker.start_run(experiment, run_name, _tags(resolved, key))
            _log_recipe(parent, resolved)
    restore = tune.Tuner.can_restore(str(storage)) and (resumed or not track)
    if not restore and storage.exists():
        shutil.rmtree(storage)  # a finished tune, or one killed before Ray saved its state: start again
    result = TuneResult(
        run_id=parent.run_id if parent else None, status="RUNNING", resumed=resumed, storage=storage
    )
    trial_log = _TrialLog(job, tracker, parent, experiment, run_name, key)
    _TRIAL_LOGS[key] = trial_log
    try:
        seed = spec.seed if spec.seed is not None else recipe.seed
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, job=job), trial_resources(spec, recipe.execution.num_workers)
        )
        address = ray_address or recipe.execution.ray_address
        workers = recipe.execution.num_workers
        if address is None and workers and workers > 1 and spec.resources_per_trial.cpu > 1:
            raise GrnxError(
                f"tune: each trial would hold {spec.resources_per_trial.cpu:g} CPUs plus "
                f"{workers - 1} for its Ray tasks (execution.num_workers: {workers}), more than the "
                f"local Ray's {workers}. Set tune.resources_per_trial.cpu: 1, or run on a cluster "
                "(execution.ray_address or --ray-address)."
            )
        # Intermediate reports lack the final metric (no strict check); trials keep grnx's working
        # folder (set before Ray starts, so a local Ray's workers inherit it); the legacy reporter is
        # silent at verbose 0.
        with (
            _environment(
                TUNE_DISABLE_STRICT_METRIC_CHECKING="1", RAY_CHDIR_TO_TRIAL_DIR="0", RAY_AIR_NEW_OUTPUT="0"
            ),
            ray_session(address, recipe.execution.num_workers),
        ):
            if restore:
                say(f"restoring the tune's state from {storage}")
                tuner = tune.Tuner.restore(
                    str(storage), trainable, resume_unfinished=True, resume_errored=False
                )
            else:
                tuner = tune.Tuner(
                    trainable,
                    param_space=search_space(spec),
                    tune_config=tune.TuneConfig(
                        search_alg=_searcher(spec, seed),
                        scheduler=_scheduler(spec, recipe.train.epochs),
                        num_samples=spec.num_samples,
                        max_concurrent_trials=spec.max_concurrent,
                        reuse_actors=True,  # a worker imports torch and grnx once, not once per trial
                    ),
                    run_config=tune.RunConfig(
                        name=key, storage_path=str(storage_root), callbacks=[_callback(key)], verbose=0
                    ),
                )
            say(f"tuning {', '.join(spec.space)}: {spec.num_samples} trials, {spec.max_concurrent} at a time")
            grid = tuner.fit()
        result.trials = _outcomes(grid, job, tracker, parent)
        _summarise(result, spec, job, tracker, parent, cache, run_name)
        result.status = "FINISHED"
        if parent is not None:
            parent.end("FINISHED")
    except BaseException as error:
        result.status = "FAILED"
        if parent is not None:
            reason = (
                "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
            )
            parent.set_tags(
                {
                    "grnx.error": f"{reason} (rerun the same command to resume the tune)",
                    "grnx.error_type": type(error).__name__,
                }
            )
            parent.end("FAILED")
        raise
    finally:
        _TRIAL_LOGS.pop(key, None)
    return result


def _outcomes(grid: Any, job: TrialJob, tracker: Any, parent: Any) -> list[TrialOutcome]:
    """Every trial of the finished tune, with its nested run (looked up by trial id)."""
    runs: dict[str, str] = {}
    if tracker is not None and parent is not None:
        children = tracker.client.search_runs(
            [tracker.experiment_id_of_run(parent.run_id)],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}' and tags.`grnx.child` = 'trial'",
            order_by=["attributes.start_time ASC"],
            max_results=10_000,
        )
        for child in children:  # the latest run of a trial that was restarted on resume wins
            runs[child.data.tags.get(TRIAL_ID_TAG, "")] = child.info.run_id
    outcomes = []
    for index, entry in enumerate(grid):
        metrics = dict(entry.metrics or {})
        trial_id = str(metrics.get("trial_id", ""))
        tag = str(metrics.get("experiment_tag", ""))
        number = int(tag.split("_", 1)[0]) if tag.split("_", 1)[0].isdigit() else index + 1
        settings = job.settings(entry.config) if entry.config else {}
        if entry.error is not None:
            status, error = (
                "failed",
                str(entry.error).strip().splitlines()[-1] if str(entry.error).strip() else "failed",
            )
        elif metrics.get(_DONE):
            status, error = "finished", None
        else:
            status, error = "stopped", None
        value = metrics.get(job.spec.metric) if status == "finished" else None
        outcomes.append(
            TrialOutcome(
                number=number,
                trial_id=trial_id,
                settings=settings,
                status=status,
                value=float(value) if value is not None and _finite(value) else None,
                epochs=int(metrics.get(_EPOCHS, metrics.get(_EPOCH, 0)) or 0),
                run_id=runs.get(trial_id),
                error=error,
            )
        )
    return sorted(outcomes, key=lambda outcome: outcome.number)


def _summarise(
    result: TuneResult, spec: TuneSpec, job: TrialJob, tracker: Any, parent: Any, cache: Any, run_name: str
) -> None:
    """The parent's record: best trial, counts, the table and figure per trial, the held-out report."""
    scored = [t for t in result.trials if t.value is not None]
    if not scored:
        raise GrnxError(
            f"no trial of the tune finished with {spec.metric!r} ({len(result.trials)} trials: "
            + ", ".join(
                f"{t.number} {t.status}{f' ({t.error})' if t.error else ''}" for t in result.trials[:5]
            )
            + "). See the trials' runs for their errors."
        )
    sign = 1.0 if spec.mode == "max" else -1.0
    best = max(scored, key=lambda t: sign * (t.value or 0.0))
    result.best = best
    metric = spec.metric
    counts = {
        status: sum(t.status == status for t in result.trials) for status in ("finished", "stopped", "failed")
    }
    result.metrics = {
        f"tune/best/{metric}": float(best.value or 0.0),
        "tune/best/trial": float(best.number),
        "tune/n_trials": float(len(result.trials)),
        **{f"tune/n_{status}": float(count) for status, count in counts.items()},
    }
    table = pd.DataFrame(
        [
            {
                "trial": t.number,
                "status": t.status,
                **{path: value for path, value in t.settings.items()},
                metric: t.value,
                "epochs": t.epochs,
                "run_id": t.run_id,
                "error": t.error,
            }
            for t in result.trials
        ]
    )
    if spec.ground_truth_split is not None:
        held_out = _held_out(best, job, tracker, parent, cache, run_name)
        result.held_out = held_out.metrics
        result.held_out_run_id = held_out.run_id
        if metric in held_out.metrics:
            result.metrics[f"tune/held_out/{metric}"] = float(held_out.metrics[metric])
    if parent is not None:
        parent.log_metrics(result.metrics)
        parent.log_params({f"tune.best.{path}": value for path, value in best.settings.items()})
        tags = {"grnx.tune.best_trial": str(best.number)}
        if best.run_id:
            tags["grnx.tune.best_run"] = best.run_id
        if result.held_out_run_id:
            tags["grnx.tune.held_out_run"] = result.held_out_run_id
        parent.set_tags(tags)
        parent.log_table("tune/trials.csv", table)
        parent.log_figure(f"tune/{_file_safe(metric)}_per_trial.png", trial_figure(result.trials, spec))


def _held_out(best: TrialOutcome, job: TrialJob, tracker: Any, parent: Any, cache: Any, run_name: str) -> Any:
    """The best trial's recipe scored on the ground truth's ``report`` part, as a nested run."""
    from grnx_core.registry import default_registry
    from grnx_core.runner import Runner

    settings = dict(best.settings)
    tags = dict(job.data.get("tracking", {}).get("tags") or {})
    settings["tracking.tags"] = {**tags, "grnx.child": "held_out", TRIAL_NUMBER_TAG: str(best.number)}
    settings["tracking.run_name"] = f"{run_name}: best trial {best.number} on the held-out ground truth"
    resolved = job.recipe(settings, part="report")
    runner = Runner(
        resolved,
        tracker=tracker,
        cache=cache,
        plugin_manager=default_registry().plugin_manager,
        parent_run=parent,
    )
    return runner.run()


def _file_safe(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def trial_figure(trials: list[TrialOutcome], spec: TuneSpec) -> Any:
    """The metric of every finished trial by trial number, the best so far as a line; trials the
    scheduler stopped or that failed are marked along the bottom."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    scored = [t for t in trials if t.value is not None]
    numbers = [t.number for t in scored]
    values = [float(t.value or 0.0) for t in scored]
    axes.plot(numbers, values, "o", label="finished trial")
    best_so_far, running = [], None
    for value in values:
        running = (
            value if running is None else (max(running, value) if spec.mode == "max" else min(running, value))
        )
        best_so_far.append(running)
    axes.step(numbers, best_so_far, where="post", color="grey", label="best so far")
    if scored:
        best = max(scored, key=lambda t: (1 if spec.mode == "max" else -1) * float(t.value or 0.0))
        axes.plot(
            [best.number],
            [float(best.value or 0.0)],
            "*",
            markersize=14,
            color="C3",
            label=f"best: trial {best.number}",
        )
    others = [t for t in trials if t.value is None]
    if others and values:
        axes.plot(
            [t.number for t in others],
            [min(values)] * len(others),
            "x",
            color="C1",
            label="stopped early or failed",
        )
    axes.set_xlabel("trial")
    axes.set_ylabel(spec.metric)
    axes.set_title(f"{spec.metric} per trial ({spec.mode})")
    axes.grid(alpha=0.3)
    axes.legend()
    return figure


__all__ = [
    "RecordingTracker",
    "TrialJob",
    "TrialOutcome",
    "TuneResult",
    "replay_record",
    "run_tune",
    "search_space",
    "tune_id",
    "validate_tune",
]
