"""A content-addressed cache of finished steps, so a rerun resumes where the last one stopped.

A step's key is a hash of everything its output depends on: the key of its input (chained from the
data digest), its component's name, version and parameters, and the seed where it draws randomness.
Entries are folders written atomically; a folder exists only if its step finished. ``grnx cache
info`` and ``grnx cache clear`` inspect and prune them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from grnx_core.atomic import atomic_path
from grnx_core.errors import GrnxError

log = logging.getLogger(__name__)

#: Bump when the layout of cached outputs changes, so old entries are not misread.
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("GRNX_CACHE_DIR") or Path.home() / ".cache" / "grnx")


def step_key(**parts: Any) -> str:
    """A stable hash of JSON-able parts (pydantic models, paths and numpy scalars are converted)."""
    payload = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=_jsonable)
    return hashlib.sha256(payload.encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"cannot hash {type(value).__name__} into a cache key")


#: Leftovers of a crashed write are removed only when nothing in them changed for this long, so a
#: write still in progress (a tokenizer streaming chunks for hours) is never pulled away.
STALE_TEMPORARY_AGE = timedelta(hours=1)

# Temporaries of grnx_core.atomic.atomic_path beside an entry: ".<key>.tmp-<random>" while it is
# written, ".<key>.old-<pid>" for a replaced entry between two renames.
_TEMPORARY_NAME = re.compile(r"^\.(?P<key>.+)\.(?:tmp|old)-[^/]*$")

_DURATION = re.compile(r"^\s*(?P<amount>\d+(?:\.\d+)?)\s*(?P<unit>[smhdw])\s*$")
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """``"7d"``, ``"12h"``, ``"30m"`` (also ``s`` and ``w``) as a timedelta."""
    match = _DURATION.match(text)
    if match is None:
        raise GrnxError(
            f"expected a duration such as 7d, 12h or 30m (a number and one of the units s, m, h, d, w), "
            f"got {text!r}."
        )
    return timedelta(**{_DURATION_UNITS[match["unit"]]: float(match["amount"])})


def format_duration(delta: timedelta) -> str:
    """The largest whole unit of a duration: ``"9d"``, ``"5h"``, ``"12m"``, ``"40s"``."""
    seconds = max(delta.total_seconds(), 0)
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def format_size(n_bytes: int) -> str:
    """Bytes in binary units: ``"512 B"``, ``"1.5 KiB"``, ``"12.3 MiB"``."""
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class CacheEntry:
    """One finished step output in the cache."""

    stage: str
    key: str
    path: Path
    n_bytes: int
    created: datetime
    #: When a run last read it (``lookup`` touches done.json) or, if never read, when it was written.
    last_used: datetime
    grnx_version: str | None = None


@dataclass(frozen=True)
class StageSummary:
    """The entries of one stage, together."""

    stage: str
    n_entries: int
    n_bytes: int
    oldest_use: datetime
    newest_use: datetime


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc)


def _tree_size_and_mtime(path: Path) -> tuple[int, float]:
    """Bytes below ``path`` and the newest mtime there; symbolic links are counted, never followed."""
    n_bytes, newest = 0, path.lstat().st_mtime
    pending = [path]
    while pending:
        try:
            with os.scandir(pending.pop()) as children:
                for child in children:
                    info = child.stat(follow_symlinks=False)
                    newest = max(newest, info.st_mtime)
                    if child.is_dir(follow_symlinks=False):
                        pending.append(Path(child.path))
                    else:
                        n_bytes += info.st_size
        except FileNotFoundError:  # removed meanwhile by another process
            continue
    return n_bytes, newest


def _subfolders(path: Path) -> list[os.DirEntry]:
    """Real folders inside ``path`` (symbolic links to folders are not followed out of the cache)."""
    try:
        with os.scandir(path) as children:
            return sorted((c for c in children if c.is_dir(follow_symlinks=False)), key=lambda c: c.name)
    except (FileNotFoundError, NotADirectoryError):
        return []


class Cache:
    """Step outputs under ``root/<stage>/<key[:2]>/<key>/``, each finished by a ``done.json`` marker.

    ``done.json`` holds the stage, key, creation time and grnx version; its mtime is when the entry
    was last used. A ``read_only`` cache serves hits but stores nothing (``store`` gives a folder
    that is thrown away): the processes other than the main one of a multi-process launch read
    what the main process stores, and so take the same cached-or-computed path through a run.
    """

    def __init__(self, root: Path | None = None, enabled: bool = True, read_only: bool = False) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.enabled = enabled
        self.read_only = read_only

    @property
    def writable(self) -> bool:
        """Whether ``store`` keeps what a step writes."""
        return self.enabled and not self.read_only

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage.replace(":", "_") / key[:2] / key

    def lookup(self, stage: str, key: str) -> Path | None:
        """The finished entry's folder, or None. A hit marks the entry as used now."""
        if not self.enabled:
            return None
        folder = self.path(stage, key)
        marker = folder / "done.json"
        if not marker.exists():
            return None
        if not self.read_only:  # the main process marks the use
            with contextlib.suppress(OSError):  # a read-only cache folder still serves hits
                os.utime(marker)
        return folder

    @contextlib.contextmanager
    def store(self, stage: str, key: str) -> Iterator[Path]:
        """Yield a temporary folder to write the step's output into; it becomes the entry on success."""
        if not self.writable:
            # Still give the step somewhere to write, then throw it away.
            import tempfile

            with tempfile.TemporaryDirectory(prefix="grnx-step-") as scratch:
                yield Path(scratch)
            return
        from grnx_core import __version__

        with atomic_path(self.path(stage, key), directory=True) as folder:
            yield folder
            marker = {
                "stage": stage,
                "key": key,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "grnx_version": __version__,
                "cache_format": CACHE_FORMAT,
            }
            (folder / "done.json").write_text(json.dumps(marker, indent=1) + "\n")

    # -- inspection and cleanup ----------------------------------------------------------------

    def stages(self) -> list[str]:
        """The stage folders in the cache (a stage's ``:`` is written as ``_``)."""
        return [f.name for f in _subfolders(self.root) if not f.name.startswith(".")]

    def entries(self, stage: str | None = None) -> Iterator[CacheEntry]:
        """Every finished entry (of one stage when given), in folder order."""
        for folder in self._entry_folders(stage):
            entry = self._read_entry(folder)
            if entry is not None:
                yield entry

    def info(self) -> dict[str, StageSummary]:
        """Count, bytes and oldest/newest last use of the entries of each stage, by stage name."""
        by_stage: dict[str, list[CacheEntry]] = {}
        for entry in self.entries():
            by_stage.setdefault(entry.stage, []).append(entry)
        return {
            stage: StageSummary(
                stage=stage,
                n_entries=len(entries),
                n_bytes=sum(e.n_bytes for e in entries),
                oldest_use=min(e.last_used for e in entries),
                newest_use=max(e.last_used for e in entries),
            )
            for stage, entries in sorted(by_stage.items())
        }

    def clear(
        self, older_than: timedelta | None = None, stage: str | None = None, *, dry_run: bool = False
    ) -> tuple[int, int]:
        """Remove finished entries not used for ``older_than`` (all when None), of ``stage`` only when
        given, and the leftovers of crashed writes there that nothing touched for an hour.

        Returns ``(n_entries, n_bytes)`` removed, leftovers included; ``dry_run`` only counts them.
        Only folders laid out as entries or their temporaries are removed, never a symbolic link's
        target. An entry is first renamed out of place, so a run never finds it half removed.
        """
        now = datetime.now(timezone.utc)
        cutoff = now - older_than if older_than is not None else None
        stale_before = now - STALE_TEMPORARY_AGE
        n_entries = n_bytes = 0
        # Listed first, so an entry this call fails to remove is not counted again as a leftover.
        temporaries = list(self._temporary_folders(stage))
        for folder in self._entry_folders(stage):
            entry = self._read_entry(folder)
            if entry is None or (cutoff is not None and entry.last_used >= cutoff):
                continue
            if dry_run or self._remove_entry(entry.path):
                n_entries += 1
                n_bytes += entry.n_bytes
        for temporary in temporaries:
            try:
                size, newest = _tree_size_and_mtime(temporary)
            except FileNotFoundError:
                continue
            if _utc(newest) >= stale_before:
                continue
            if not dry_run:
                _remove_tree(temporary)
            n_entries += 1
            n_bytes += size
        return n_entries, n_bytes

    def _prefix_folders(self, stage: str | None) -> Iterator[Path]:
        wanted = stage.replace(":", "_") if stage is not None else None
        for stage_folder in _subfolders(self.root):
            if stage_folder.name.startswith(".") or (wanted is not None and stage_folder.name != wanted):
                continue
            for prefix in _subfolders(Path(stage_folder.path)):
                yield Path(prefix.path)

    def _entry_folders(self, stage: str | None) -> Iterator[Path]:
        for prefix in self._prefix_folders(stage):
            for child in _subfolders(prefix):
                if not child.name.startswith(".") and child.name[:2] == prefix.name:
                    yield Path(child.path)

    def _temporary_folders(self, stage: str | None) -> Iterator[Path]:
        for prefix in self._prefix_folders(stage):
            for child in _subfolders(prefix):
                match = _TEMPORARY_NAME.match(child.name)
                if match is not None and match["key"][:2] == prefix.name:
                    yield Path(child.path)

    def _read_entry(self, folder: Path) -> CacheEntry | None:
        marker = folder / "done.json"
        try:
            marker_stat = marker.lstat()
            if not stat.S_ISREG(marker_stat.st_mode):
                return None
            n_bytes, _ = _tree_size_and_mtime(folder)
        except FileNotFoundError:  # unfinished, or removed meanwhile
            return None
        try:
            content = json.loads(marker.read_text())
        except (OSError, ValueError):
            content = {}
        if not isinstance(content, dict):
            content = {}
        try:
            created = datetime.fromisoformat(content["created"])
        except (KeyError, TypeError, ValueError):
            # Entries of earlier grnx versions: the folder's mtime is when the write finished.
            created = _utc(folder.lstat().st_mtime)
        stage = content.get("stage")
        version = content.get("grnx_version")
        return CacheEntry(
            stage=stage if isinstance(stage, str) else folder.parent.parent.name,
            key=folder.name,
            path=folder,
            n_bytes=n_bytes,
            created=created,
            last_used=_utc(marker_stat.st_mtime),
            grnx_version=version if isinstance(version, str) else None,
        )

    @staticmethod
    def _remove_entry(folder: Path) -> bool:
        retired = folder.with_name(f".{folder.name}.old-clear-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.rename(folder, retired)
        except FileNotFoundError:  # another process removed it first
            return False
        _remove_tree(retired)
        return True


def _remove_tree(path: Path) -> None:
    # rmtree never follows symbolic links; what it cannot remove stays as a leftover for next time.
    try:
        shutil.rmtree(path)
    except OSError as error:
        log.warning("could not remove all of %s from the cache: %s", path, error)


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's content (of every file below a folder), remembered per size and mtime."""
    path = Path(path)
    if path.is_dir():
        hasher = hashlib.sha256()
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            hasher.update(str(child.relative_to(path)).encode())
            hasher.update(file_digest(child).encode())
        return hasher.hexdigest()
    if not path.exists():
        return "missing"
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _FILE_DIGESTS:
        hasher = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(block)
        _FILE_DIGESTS[memo] = hasher.hexdigest()
    return _FILE_DIGESTS[memo]


def array_digest(hasher: Any, array: Any, chunk_rows: int = 65_536) -> None:
    """Feed an array (dense, sparse, or backed) into a hash, chunk by chunk."""
    import scipy.sparse as sp

    if sp.issparse(array):
        array = array.tocsr() if not sp.isspmatrix_csr(array) else array
        array.sort_indices()
        for part in (array.indptr, array.indices, array.data):
            hasher.update(np.ascontiguousarray(part).tobytes())
        hasher.update(repr(array.shape).encode())
        return
    n_rows = array.shape[0]
    hasher.update(repr(array.shape).encode())
    for start in range(0, n_rows, chunk_rows):
        block = array[start : start + chunk_rows]
        if sp.issparse(block):
            block = block.toarray()
        hasher.update(np.ascontiguousarray(block).tobytes())


def anndata_digest(adata: Any) -> str:
    """Digest of an AnnData's expression, layers, names and obs table (the run's data digest)."""
    import pandas as pd

    hasher = hashlib.sha256()
    hasher.update("\0".join(map(str, adata.obs_names)).encode())
    hasher.update("\0".join(map(str, adata.var_names)).encode())
    array_digest(hasher, adata.X)
    for name in sorted(adata.layers.keys()):
        hasher.update(name.encode())
        array_digest(hasher, adata.layers[name])
    if adata.obs.shape[1]:
        hasher.update(pd.util.hash_pandas_object(adata.obs.astype(str), index=False).to_numpy().tobytes())
    return hasher.hexdigest()
