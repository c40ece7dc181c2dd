"""MLflow tracking: the only module that imports mlflow.

The default store is ``sqlite:///<repo>/mlflow/mlflow.db`` with artifacts in ``<repo>/mlflow/artifacts``;
``MLFLOW_TRACKING_URI`` overrides it. Metrics and params go out in batches (single calls cost
~5 ms each on SQLite).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from grnx_core.errors import GrnxError

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000


def store_dir() -> Path:
    """``<repo>/mlflow`` for a source checkout, else ``./mlflow``."""
    in_repo = REPO_ROOT / "mlflow"
    return in_repo if in_repo.is_dir() and (REPO_ROOT / "pyproject.toml").exists() else Path.cwd() / "mlflow"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_dir() / 'mlflow.db'}"


def artifact_root_for(tracking_uri: str) -> Path | None:
    """For a SQLite store, artifacts live in ``artifacts/`` beside the database file."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):]).parent / "artifacts"
    return None


def git_commit(path: Path = REPO_ROOT) -> str | None:
    """The commit of the code, with "-dirty" when the work tree has changes; None outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=path, capture_output=True,
            text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if status else commit


def _param_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


class Tracker:
    """Opens runs in one tracking store."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        import mlflow

        self.tracking_uri = tracking_uri or default_tracking_uri()
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self._mlflow = mlflow
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.artifact_root = artifact_root_for(self.tracking_uri)

    def experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise GrnxError(
                    f"MLflow experiment {name!r} was deleted; restore it in the UI or set tracking.experiment "
                    "to another name."
                )
            return experiment.experiment_id
        location = None
        if self.artifact_root is not None:
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
            location = (self.artifact_root / safe).resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created concurrently by another process
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def start_run(
        self, experiment: str, run_name: str, tags: dict[str, str] | None = None, parent: TrackedRun | None = None
    ) -> TrackedRun:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        tags = dict(tags or {})
        tags[MLFLOW_RUN_NAME] = run_name
        if parent is not None:
            tags[MLFLOW_PARENT_RUN_ID] = parent.run_id
        run = self.client.create_run(self.experiment_id(experiment), tags=tags, run_name=run_name)
        return TrackedRun(self, run.info.run_id)


class TrackedRun:
    """One MLflow run; implements the ``RunLogger`` protocol components log through."""

    def __init__(self, tracker: Tracker, run_id: str) -> None:
        self.tracker = tracker
        self.client = tracker.client
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        long_values = {}
        items = []
        for key, value in params.items():
            text = _param_value(value)
            if len(text) > MAX_PARAM_LENGTH:
                # Never truncate silently: the full value goes to an artifact the param points to.
                long_values[key] = text
                text = text[: MAX_PARAM_LENGTH - 60] + " ... (full value in params/long_values.json)"
            items.append(Param(key, text))
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])
        if long_values:
            self.log_text(json.dumps(long_values, indent=1), "params/long_values.json")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        items = [Metric(key, float(value), timestamp, step or 0) for key, value in metrics.items()]
        for start in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[start : start + MAX_METRICS_PER_BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(key, str(value)[:MAX_PARAM_LENGTH]) for key, value in tags.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=items[start : start + MAX_PARAMS_PER_BATCH])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, name: str, figure: Any) -> None:
        """``name`` is the artifact path, e.g. ``eval/figures/nes_pearson.png``."""
        import matplotlib.pyplot as plt

        if not name.endswith(".png"):
            name += ".png"
        with tempfile.TemporaryDirectory() as scratch:
            target = Path(scratch) / Path(name).name
            figure.savefig(target, dpi=120, bbox_inches="tight")
            self.log_artifact(target, str(Path(name).parent) if Path(name).parent != Path(".") else None)
        plt.close(figure)

    def log_table(self, name: str, table: pd.DataFrame) -> None:
        if not name.endswith(".csv"):
            name += ".csv"
        with tempfile.TemporaryDirectory() as scratch:
            target = Path(scratch) / Path(name).name
            table.to_csv(target, index=False)
            self.log_artifact(target, str(Path(name).parent) if Path(name).parent != Path(".") else None)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
