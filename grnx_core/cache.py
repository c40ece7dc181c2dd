"""A content-addressed cache of finished steps, so a rerun resumes where the last one stopped.

A step's key is a hash of everything its output depends on: the key of its input (chained from the
data digest), its component's name, version and parameters, and the seed where it draws randomness.
Entries are folders written atomically; a folder exists only if its step finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from grnx_core.atomic import atomic_path

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


class Cache:
    """Step outputs under ``root/<stage>/<key>/``."""

    def __init__(self, root: Path | None = None, enabled: bool = True) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.enabled = enabled

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage.replace(":", "_") / key[:2] / key

    def lookup(self, stage: str, key: str) -> Path | None:
        """The finished entry's folder, or None."""
        if not self.enabled:
            return None
        folder = self.path(stage, key)
        return folder if (folder / "done.json").exists() else None

    @contextlib.contextmanager
    def store(self, stage: str, key: str) -> Iterator[Path]:
        """Yield a temporary folder to write the step's output into; it becomes the entry on success."""
        if not self.enabled:
            # Still give the step somewhere to write, then throw it away.
            import tempfile

            with tempfile.TemporaryDirectory(prefix="grnx-step-") as scratch:
                yield Path(scratch)
            return
        with atomic_path(self.path(stage, key), directory=True) as folder:
            yield folder
            (folder / "done.json").write_text(json.dumps({"stage": stage, "key": key}))


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
