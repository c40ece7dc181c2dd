"""What a stage logged, recorded beside its cached output so a cache hit logs exactly the same.

While a stage computes, its components log through a :class:`RecordingLogger`: every call goes to
the run's logger and is written down (metrics with their steps; figures, tables and artifacts as
files in the cache entry). A later run served from the cache replays the record, so the MLflow UI
shows the same training curves, figures and artifacts whether a stage ran or came from the cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from grnx_core.context import RunLogger

RECORD_FILE = "logged.json"
FILES_FOLDER = "logged"


class RecordingLogger:
    """A :class:`~grnx_core.context.RunLogger` that forwards to ``target`` and records into ``folder``."""

    def __init__(self, target: RunLogger, folder: Path) -> None:
        self.target = target
        self.folder = Path(folder)
        self.events: list[dict[str, Any]] = []

    # -- the RunLogger protocol ---------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {str(k): float(v) for k, v in metrics.items()}
        self.events.append({"metrics": clean, "step": step})
        self.target.log_metrics(clean, step=step)

    def log_figure(self, name: str, figure: Any) -> None:
        import matplotlib.pyplot as plt

        if not name.endswith(".png"):
            name += ".png"
        file = self._file_for(name)
        figure.savefig(file, dpi=120, bbox_inches="tight")
        plt.close(figure)
        self._artifact(file, name)

    def log_table(self, name: str, table: Any) -> None:
        if not name.endswith(".csv"):
            name += ".csv"
        file = self._file_for(name)
        table.to_csv(file, index=False)
        self._artifact(file, name)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        name = f"{artifact_path}/{path.name}" if artifact_path else path.name
        file = self._file_for(name)
        if path.resolve() != file.resolve():  # written in place through artifact_file(): no copy
            if path.is_dir():
                shutil.copytree(path, file, dirs_exist_ok=True)
            else:
                shutil.copyfile(path, file)
        self._artifact(file, name)

    def artifact_file(self, name: str) -> Path:
        """Where to write an artifact ``name`` (e.g. ``interactions/x.parquet``) before logging it, so
        that the entry keeps one copy; read it back later with :func:`artifact_path`."""
        return self._file_for(name)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.events.append({"tags": {str(k): str(v) for k, v in tags.items()}})
        self.target.set_tags(tags)

    def log_params(self, params: dict[str, Any]) -> None:
        # Params describe the recipe, which the runner logs; a stage's params are not replayed.
        self.target.log_params(params)

    def log_text(self, text: str, artifact_file: str) -> None:
        file = self._file_for(artifact_file)
        file.write_text(text, encoding="utf-8")
        self._artifact(file, artifact_file)

    # -- recording ------------------------------------------------------------------------------

    def _file_for(self, name: str) -> Path:
        file = self.folder / FILES_FOLDER / name
        file.parent.mkdir(parents=True, exist_ok=True)
        return file

    def _artifact(self, file: Path, name: str) -> None:
        parent = str(Path(name).parent)
        self.events.append({"artifact": name, "artifact_path": None if parent == "." else parent})
        self.target.log_artifact(file, None if parent == "." else parent)

    def save(self) -> None:
        (self.folder / RECORD_FILE).write_text(json.dumps(self.events), encoding="utf-8")


def artifact_path(folder: Path, name: str) -> Path:
    """The file a stage cached in ``folder`` logged as artifact ``name``."""
    return Path(folder) / FILES_FOLDER / name


def replay(folder: Path, target: RunLogger) -> None:
    """Log what the stage cached in ``folder`` recorded, to ``target``, in the original order."""
    record = Path(folder) / RECORD_FILE
    if record.is_file():
        replay_events(json.loads(record.read_text(encoding="utf-8")), folder, target)


def replay_events(events: list[dict[str, Any]], folder: Path | None, target: RunLogger) -> None:
    """Log recorded ``events``; artifacts come from ``folder`` and are skipped when it is gone."""
    pending: dict[int | None, dict[str, float]] = {}
    for event in events:
        if "metrics" in event:
            pending.setdefault(event["step"], {}).update(event["metrics"])
            continue
        _flush(pending, target)
        if "tags" in event:
            target.set_tags(event["tags"])
        elif "artifact" in event and folder is not None:
            file = Path(folder) / FILES_FOLDER / event["artifact"]
            if file.exists():
                target.log_artifact(file, event["artifact_path"])
    _flush(pending, target)


def _flush(pending: dict[int | None, dict[str, float]], target: RunLogger) -> None:
    """Metrics go out one batch per step (SQLite stores take ~5 ms a call)."""
    for step, metrics in pending.items():
        target.log_metrics(metrics, step=step)
    pending.clear()
