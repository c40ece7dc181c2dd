"""Atomic file and directory writes: a reader never sees a half-written output."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it into place only if the block succeeds.

    Use ``directory=True`` for outputs that are folders. An existing target is replaced.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    if directory:
        temporary = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=prefix, dir=target.parent, suffix=target.suffix)
        os.close(handle)
        temporary = Path(name)
    try:
        yield temporary
        if directory:
            if target.exists():
                # Two renames keep the window without a complete target as short as possible.
                retired = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, retired)
                os.replace(temporary, target)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.replace(temporary, target)
        else:
            os.replace(temporary, target)
    except BaseException:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
        raise


def write_text(target: str | os.PathLike[str], text: str) -> None:
    with atomic_path(target) as temporary:
        temporary.write_text(text, encoding="utf-8")
