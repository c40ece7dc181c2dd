"""MLflow tracking: the only module that imports mlflow.

The default store is ``sqlite:///<repo>/mlflow/mlflow.db`` with artifacts in ``<repo>/mlflow/artifacts``;
``MLFLOW_TRACKING_URI`` overrides it. Metrics and params go out in batches (single calls cost
~5 ms each on SQLite). Runs are tagged with the host and process that own them, so a run left
RUNNING by a killed process is marked FAILED by the next one (``Tracker.fail_orphaned_runs``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from grnx_core.errors import GrnxError

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000

#: Tags that say which process owns a run, so a run left RUNNING by a killed process can be found.
HOST_TAG = "grnx.host"
PID_TAG = "grnx.pid"
PROCESS_START_TAG = "grnx.process_start"
PID_NAMESPACE_TAG = "grnx.pid_namespace"
#: A process whose start time differs by more than this from the tagged one is another process that
#: reused the pid. Generous, because the epoch-based start time moves when the system clock is
#: stepped, and judging a live run dead is worse than finding a dead one a run later.
PROCESS_START_TOLERANCE_S = 60.0

#: The MLflow UI (3.x) opens an experiment in its GenAI view, which lists no runs; this query
#: parameter opens the classic view with the runs table (routes of mlflow/server/js: a hash router
#: with /experiments/:experimentId/runs and /experiments/:experimentId/runs/:runUuid).
UI_RUNS_VIEW = "workflowType=machine_learning"
DEFAULT_UI_URL = "http://127.0.0.1:5000"


def experiment_url(experiment_id: str, base: str = DEFAULT_UI_URL) -> str:
    """The MLflow UI page of an experiment's runs table."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{UI_RUNS_VIEW}"


def run_url(experiment_id: str, run_id: str, base: str = DEFAULT_UI_URL) -> str:
    """The MLflow UI page of one run."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{UI_RUNS_VIEW}"


def store_dir() -> Path:
    """``<repo>/mlflow`` for a source checkout, else ``./mlflow``."""
    in_repo = REPO_ROOT / "mlflow"
    return in_repo if in_repo.is_dir() and (REPO_ROOT / "pyproject.toml").exists() else Path.cwd() / "mlflow"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_dir() / 'mlflow.db'}"


@contextlib.contextmanager
def _store_creation_lock(tracking_uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite store's file while the store is opened.

    Opening a store that does not exist yet creates its tables; two processes doing it at once
    both try, and one fails with ``table ... already exists``. Other stores are not locked.
    """
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    database = Path(tracking_uri[len("sqlite:///") :])
    database.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    with open(database.parent / f"{database.name}-grnx.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def artifact_root_for(tracking_uri: str) -> Path | None:
    """For a SQLite store, artifacts live in ``artifacts/`` beside the database file."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///") :]).parent / "artifacts"
    return None


def git_commit(path: Path = REPO_ROOT) -> str | None:
    """The commit of the code, with "-dirty" when the work tree has changes; None outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
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


def process_state(pid: int) -> tuple[bool, float | None]:
    """Whether process ``pid`` of this host is alive (a zombie has ended), and when it started, in
    seconds since the epoch (None when that cannot be read)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return False, None
            return True, process.create_time()
        except psutil.NoSuchProcess:
            return False, None
        except psutil.AccessDenied:
            return True, None
    try:
        # Field 22 of /proc/<pid>/stat is the start in clock ticks after boot, as psutil reads it;
        # the name (field 2) may hold spaces and parentheses, so fields are counted after its ")".
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        state, ticks = fields[0], int(fields[19])
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        if state in ("Z", "X"):
            return False, None
        return True, boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):  # gone, or no /proc (macOS without psutil)
        return _pid_exists(pid), None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _pid_namespace() -> str | None:
    """Containers on one host name can have separate pid spaces; their runs cannot be judged here."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _owner_tags() -> dict[str, str]:
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    _, started = process_state(os.getpid())
    if started is not None:
        tags[PROCESS_START_TAG] = repr(started)
    namespace = _pid_namespace()
    if namespace is not None:
        tags[PID_NAMESPACE_TAG] = namespace
    return tags


def _owner_ended(tags: dict[str, str]) -> str | None:
    """Why the process that owns a run of this host has ended, or None when it may be alive."""
    try:
        pid = int(tags[PID_TAG])
    except (KeyError, ValueError):
        return None
    alive, started = process_state(pid)
    if not alive:
        return f"process {pid} on host {tags[HOST_TAG]} ended without finishing this run"
    try:
        recorded = float(tags[PROCESS_START_TAG])
    except (KeyError, ValueError):
        return None
    if started is not None and abs(started - recorded) > PROCESS_START_TOLERANCE_S:
        return (
            f"process {pid} on host {tags[HOST_TAG]} ended without finishing this run (pid {pid} now "
            "belongs to another process)"
        )
    return None


class Tracker:
    """Opens runs in one tracking store."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        import mlflow

        self.tracking_uri = tracking_uri or default_tracking_uri()
        self._mlflow = mlflow
        with _store_creation_lock(self.tracking_uri):
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            # The first request opens the store (creating and migrating its tables when it is new),
            # so it is made here, under the lock, and not in whichever call comes first.
            self.client.search_experiments(max_results=1)
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
        self,
        experiment: str,
        run_name: str,
        tags: dict[str, str] | None = None,
        parent: TrackedRun | None = None,
    ) -> TrackedRun:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        tags = dict(tags or {})
        tags[MLFLOW_RUN_NAME] = run_name
        tags.update(_owner_tags())
        if parent is not None:
            tags[MLFLOW_PARENT_RUN_ID] = parent.run_id
        run = self.client.create_run(self.experiment_id(experiment), tags=tags, run_name=run_name)
        return TrackedRun(self, run.info.run_id)

    def experiment_id_of_run(self, run_id: str) -> str:
        return str(self.client.get_run(run_id).info.experiment_id)

    def recent_experiments(self, limit: int = 10) -> tuple[list[tuple[str, str]], int]:
        """(id, name) of the experiments updated last, MLflow's empty "Default" left out, and how
        many experiments there are in all."""
        experiments = [
            experiment
            for experiment in self.client.search_experiments(
                max_results=1000, order_by=["last_update_time DESC"]
            )
            if not (experiment.experiment_id == "0" and experiment.name == "Default")
        ]
        return [(e.experiment_id, e.name) for e in experiments[:limit]], len(experiments)

    def fail_orphaned_runs(self, found_by: str | None = None) -> list[str]:
        """Mark FAILED the runs left RUNNING by processes of this host that were killed outright.

        Searches every experiment for RUNNING runs tagged with this host whose process is gone (or
        whose pid now belongs to another process), tags each with ``grnx.error`` and ends it
        as FAILED. Runs of other hosts or pid namespaces are left alone: their processes cannot be
        seen from here. ``found_by`` is the id of the run doing the search, named in the tag.
        Returns the ids of the runs marked.
        """
        from mlflow.entities import RunStatus

        host = socket.gethostname()
        namespace = _pid_namespace()
        finder = f"run {found_by}" if found_by else f"process {os.getpid()}"
        at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        # Host names hold no quotes (RFC 1123); the tag is compared again below all the same.
        query = (
            f"attributes.status = '{RunStatus.to_string(RunStatus.RUNNING)}' and tags.`{HOST_TAG}` = '{host}'"
        )
        experiment_ids = self._experiment_ids()
        # Every page is read before any run is ended: ending one shrinks the result set, and the
        # page token (an offset) would then skip runs.
        candidates = [
            run
            for start in range(0, len(experiment_ids), 100)
            for run in self._search_all_runs(experiment_ids[start : start + 100], query)
        ]
        failed = []
        for run in candidates:
            tags = run.data.tags
            if tags.get(HOST_TAG) != host:
                continue
            if namespace is not None and tags.get(PID_NAMESPACE_TAG, namespace) != namespace:
                continue
            reason = _owner_ended(tags)
            if reason is None:
                continue
            run_id = run.info.run_id
            TrackedRun(self, run_id).set_tags(
                {
                    "grnx.error": f"killed: {reason} (found by {finder} at {at})",
                    "grnx.error_type": "Killed",
                }
            )
            self.client.set_terminated(run_id, status="FAILED")
            failed.append(run_id)
        return failed

    def _experiment_ids(self) -> list[str]:
        ids: list[str] = []
        token: str | None = None
        while True:
            page = self.client.search_experiments(max_results=1000, page_token=token)
            ids.extend(experiment.experiment_id for experiment in page)
            token = page.token
            if not token:
                return ids

    def _search_all_runs(self, experiment_ids: list[str], query: str) -> Iterator[Any]:
        token = None
        while True:
            page = self.client.search_runs(
                experiment_ids, filter_string=query, max_results=1000, page_token=token
            )
            yield from page
            token = page.token
            if not token:
                return


class TrackedRun:
    """One MLflow run; implements the ``RunLogger`` protocol components log through."""

    def __init__(self, tracker: Tracker, run_id: str) -> None:
        self.tracker = tracker
        self.client = tracker.client
        self.run_id = run_id

    @property
    def artifact_uri(self) -> str:
        """Where the run's artifacts are (a file:// URI for the default store)."""
        return str(self.client.get_run(self.run_id).info.artifact_uri)

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

        items = []
        long_values = {}
        for key, value in tags.items():
            text = str(value)
            if len(text) > MAX_PARAM_LENGTH:
                # Never truncate silently: the whole value goes to an artifact the tag names.
                artifact = f"tags/{re.sub(r'[^A-Za-z0-9_.-]+', '_', key)}.txt"
                long_values[artifact] = text
                note = f" ... ({len(text):,} characters; the whole value is the artifact {artifact})"
                text = text[: MAX_PARAM_LENGTH - len(note)] + note
            items.append(RunTag(key, text))
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=items[start : start + MAX_PARAMS_PER_BATCH])
        for artifact, text in long_values.items():
            self.log_text(text, artifact)

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
