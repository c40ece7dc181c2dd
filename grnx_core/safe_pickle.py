"""Reading pickles of plain data (Geneformer's gene dictionaries) without running code from them.

``pickle.load`` calls whatever callable a file names, so a pickle from elsewhere can run any
code. :func:`load_plain_pickle` reads with an unpickler that builds containers, strings and
numbers from the pickle's own opcodes and resolves only the globals plain data needs:

* ``set`` and ``frozenset`` (protocols 0-3 pickle a set as a call of its type);
* ``numpy.dtype`` and numpy's ``scalar`` constructor, restricted to number, bool and string
  dtypes: Geneformer's ``.pkl`` dictionaries hold numpy scalars (token ids as ``int16``, medians as
  ``float32``/``float64``). These two are the only globals any of Geneformer's dictionaries names
  (checked with ``pickletools`` on the V1 and V2 files in ``/work/shared/data/geneformer``; none
  holds an array, so array reconstruction is not admitted).

Any other global (``os.system``, ``builtins.eval``, a class) and every persistent id is refused
before anything is called, and files above a size limit are refused before they are read.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from grnx_core.errors import DataError

__all__ = ["MAX_PICKLE_BYTES", "load_plain_pickle"]

#: Refuse larger pickles: Geneformer's largest dictionary is 4 MB, and unpickling needs several
#: times a file's size in memory.
MAX_PICKLE_BYTES = 256 * 1024 * 1024

#: What the refusal message says a readable pickle may hold.
_ADMITTED = "dict, list, tuple, set, str, int, float, bool, None and numpy numbers or strings"

#: numpy dtype kinds a scalar may have: bool, signed and unsigned integers, floats, complex,
#: bytes and unicode strings. Object ("O") and void ("V", structured) dtypes can carry anything.
_SCALAR_KINDS = frozenset("biufcSU")


def load_plain_pickle(path: str | Path, *, what: str = "pickle", max_bytes: int = MAX_PICKLE_BYTES) -> Any:
    """The object pickled in ``path``, which may hold only plain data (see the module docstring).

    ``what`` names the file in messages (``"token dictionary"``). Raises :class:`DataError`
    naming the file and, when it asks for one, the refused global.
    """
    path = Path(path)
    label = f"{what} {path}"
    try:
        size = path.stat().st_size
    except OSError as error:
        raise DataError(f"Could not read the {label}: {error.strerror or error}.") from error
    if size > max_bytes:
        raise DataError(
            f"Refusing to load the {label}: it is {size:,} bytes and grnx reads pickles of at most "
            f"{max_bytes:,} bytes (plain-data dictionaries are far smaller). Check that this is the "
            f"right file, or convert it to TSV or JSON."
        )
    with open(path, "rb") as handle:
        try:
            return _PlainDataUnpickler(handle, label).load()
        except DataError:
            raise
        except Exception as error:  # a corrupt or truncated pickle fails in many ways
            raise DataError(
                f"Could not read the {label} as a pickle: {type(error).__name__}: {error}. "
                f"The file may be truncated or not a pickle; download or write it again."
            ) from error


class _PlainDataUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, label: str) -> None:
        super().__init__(file)
        self.label = label

    def find_class(self, module: str, name: str) -> Any:  # pickle's hook for every global
        admitted = _ADMITTED_GLOBALS.get((module, name))
        if admitted is None:
            raise DataError(
                f"Refusing to load the {self.label}: the pickle asks for the global {module}.{name}, "
                f"which grnx does not resolve: a pickle's globals can run code. grnx reads pickles "
                f"holding only {_ADMITTED}. Use a file from a source you trust, or convert it to TSV "
                f"or JSON."
            )
        return admitted(self.label)

    def persistent_load(self, pid: Any) -> Any:  # pickle's hook for persistent ids
        raise DataError(
            f"Refusing to load the {self.label}: it refers to a persistent id ({str(pid)[:80]!r}), "
            f"which plain data never does; resolving it is up to the program that wrote the file."
        )


def _checked_dtype(label: str) -> Callable[..., np.dtype]:
    def dtype(*args: Any) -> np.dtype:
        made = np.dtype(*args)
        _require_plain_kind(made, label)
        return made

    return dtype


def _checked_scalar(label: str) -> Callable[..., Any]:
    scalar = _numpy_scalar_constructor()

    def checked_scalar(dtype: Any, *args: Any) -> Any:
        if not isinstance(dtype, np.dtype):
            raise DataError(
                f"Refusing to load the {label}: a numpy scalar is built from {type(dtype).__name__} "
                f"instead of a dtype."
            )
        _require_plain_kind(dtype, label)
        return scalar(dtype, *args)

    return checked_scalar


def _require_plain_kind(dtype: np.dtype, label: str) -> None:
    if dtype.kind not in _SCALAR_KINDS or dtype.fields is not None:
        raise DataError(
            f"Refusing to load the {label}: it holds a numpy value of dtype {dtype!r}; grnx reads "
            f"pickles holding only {_ADMITTED}."
        )


def _numpy_scalar_constructor() -> Callable[..., Any]:
    # numpy 2 moved numpy.core to numpy._core; pickles written by either name the one they saw.
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(module).scalar
        except (ImportError, AttributeError):
            continue
    raise ImportError("numpy has no multiarray.scalar")  # pragma: no cover - every numpy has one


def _builtin(kind: type) -> Callable[[str], type]:
    return lambda label: kind


#: (module, name) -> a factory, given the file's label, of what that global resolves to.
_ADMITTED_GLOBALS: dict[tuple[str, str], Callable[[str], Any]] = {
    ("builtins", "set"): _builtin(set),
    ("builtins", "frozenset"): _builtin(frozenset),
    ("__builtin__", "set"): _builtin(set),  # protocol 0-2 pickles use Python 2's module name
    ("__builtin__", "frozenset"): _builtin(frozenset),
    ("numpy", "dtype"): _checked_dtype,
    ("numpy.core.multiarray", "scalar"): _checked_scalar,
    ("numpy._core.multiarray", "scalar"): _checked_scalar,
}
