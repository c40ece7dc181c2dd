"""What a step's cached output depends on besides its inputs: the component's code and settings.

A step's identity holds the registered name, the class, its params, the distribution that provides
it and that distribution's version, grnx's version, and a digest of the source code: the module
that defines the class plus the private modules (``_*.py``) of its package, where components keep
their kernels and shared helpers. So editing a component's source, or a helper it uses, changes
its cache key and the keys of every step after it, and nothing before.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from functools import cache
from pathlib import Path
from typing import Any

from grnx_core import __version__


@cache
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _digest_of(path: Path) -> str:
    stat = path.stat()
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


def source_files(cls: type) -> list[Path]:
    """The source files whose content keys ``cls``'s outputs (module + private package siblings)."""
    module = sys.modules.get(cls.__module__)
    try:
        file = inspect.getsourcefile(cls) or (getattr(module, "__file__", None) if module else None)
    except TypeError:  # classes defined in a notebook or built dynamically have no file
        file = None
    if not file:
        return []
    path = Path(file).resolve()
    files = [path]
    package = getattr(module, "__package__", None) if module else None
    if package and path.parent.joinpath("__init__.py").exists():
        files += sorted(p.resolve() for p in path.parent.glob("_*.py") if p.name != "__init__.py")
    return list(dict.fromkeys(files))


def code_digest(cls: type) -> str:
    """SHA-256 over the source files of :func:`source_files` (names and contents), cached by mtime."""
    hasher = hashlib.sha256()
    files = source_files(cls)
    if not files:  # no source to read: fall back to the qualified name (and the version, in the identity)
        hasher.update(f"{cls.__module__}.{cls.__qualname__}".encode())
    for path in files:
        hasher.update(path.name.encode())
        hasher.update(_digest_of(path).encode())
    return hasher.hexdigest()


def component_identity(
    name: str, cls: type, params: Any, plugin: str = "", plugin_version: str = ""
) -> dict[str, Any]:
    """The parts of a cache key that describe the component itself."""
    return {
        "name": name,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "version": cls.version() if hasattr(cls, "version") else "1",
        "distribution": plugin,
        "distribution_version": plugin_version,
        "grnx": __version__,
        "code": code_digest(cls),
        "params": params.model_dump(mode="json") if hasattr(params, "model_dump") else params,
    }


DIGEST_MEMO_FILE = "file_digests.json"


def input_file_digest(path: str | Path, memo_dir: Path | None = None) -> str:
    """SHA-256 of an input file (or of every file below a folder), streamed over its bytes.

    The digest of a large file is remembered in ``memo_dir/file_digests.json`` by path, size,
    modification time and inode, so a rerun on an unchanged 3 GB h5ad does not read it again.
    """
    from grnx_core.cache import file_digest

    path = Path(path)
    if memo_dir is None or not path.is_file():
        return file_digest(path)
    stat = path.stat()
    memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    memo_file = Path(memo_dir) / DIGEST_MEMO_FILE
    try:
        memo = json.loads(memo_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    if memo_key in memo:
        return str(memo[memo_key])
    digest = file_digest(path)
    memo = {k: v for k, v in memo.items() if not k.startswith(f"{path.resolve()}|")}
    memo[memo_key] = digest
    from grnx_core.atomic import write_text

    try:
        write_text(memo_file, json.dumps(memo))
    except OSError:  # a read-only cache folder only costs the rereading
        pass
    return digest
