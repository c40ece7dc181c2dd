"""Saving a component's params and fitted state without pickles (JSON and ``.npy`` files).

Fitted state is every attribute whose name ends in ``_`` (scikit-learn's convention). Plain values
(str, numbers, bools, None, lists and dicts of them) go to JSON; numpy arrays to ``.npy`` files read
back with ``allow_pickle=False``; pandas indexes and series as lists. Anything else is refused with
the attribute's name, so a component with richer state knows to override ``save``/``load``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from grnx_core.atomic import atomic_path
from grnx_core.errors import GrnxError

if TYPE_CHECKING:
    from grnx_core.components import Component

STATE_FILE = "grnx_state.json"


def _encode(value: Any, name: str, folder: Path, arrays: list[str]) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return {"__list__": [_encode(v, name, folder, arrays) for v in value.tolist()]}
        file = f"{name.replace('/', '_')}_{len(arrays)}.npy"
        np.save(folder / file, value, allow_pickle=False)
        arrays.append(file)
        return {"__array__": file}
    if isinstance(value, pd.Index):
        return {"__index__": [_encode(v, name, folder, arrays) for v in value.tolist()]}
    if isinstance(value, pd.Series):
        return {
            "__series__": {
                "index": value.index.astype(str).tolist(),
                "values": [_encode(v, name, folder, arrays) for v in value.tolist()],
            }
        }
    if isinstance(value, Path):
        return {"__path__": str(value)}
    if isinstance(value, (list, tuple)):
        return [_encode(v, name, folder, arrays) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            return {
                "__items__": [
                    [_encode(k, name, folder, arrays), _encode(v, name, folder, arrays)]
                    for k, v in value.items()
                ]
            }
        return {k: _encode(v, f"{name}.{k}", folder, arrays) for k, v in value.items()}
    raise GrnxError(
        f"cannot save fitted attribute {name!r} of type {type(value).__name__} without pickles; "
        "the component must override save() and load()."
    )


def _decode(value: Any, folder: Path) -> Any:
    if isinstance(value, list):
        return [_decode(v, folder) for v in value]
    if not isinstance(value, dict):
        return value
    if "__array__" in value and len(value) == 1:
        return np.load(folder / value["__array__"], allow_pickle=False)
    if "__list__" in value and len(value) == 1:
        return np.array([_decode(v, folder) for v in value["__list__"]], dtype=object)
    if "__index__" in value and len(value) == 1:
        return pd.Index([_decode(v, folder) for v in value["__index__"]])
    if "__series__" in value and len(value) == 1:
        stored = value["__series__"]
        return pd.Series([_decode(v, folder) for v in stored["values"]], index=stored["index"])
    if "__path__" in value and len(value) == 1:
        return Path(value["__path__"])
    if "__items__" in value and len(value) == 1:
        return {_hashable(_decode(k, folder)): _decode(v, folder) for k, v in value["__items__"]}
    return {k: _decode(v, folder) for k, v in value.items()}


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def save_state(component: Any, path: Path) -> None:
    """Write ``component``'s params and fitted attributes to the folder ``path``, atomically."""
    with atomic_path(Path(path), directory=True) as folder:
        arrays: list[str] = []
        state = {
            name: _encode(value, name, folder, arrays)
            for name, value in sorted(vars(component).items())
            if name.endswith("_") and not name.startswith("_")
        }
        document = {
            "component": component.name,
            "version": component.version(),
            "params": _encode(component.get_params(), "params", folder, arrays),
            "state": state,
        }
        (folder / STATE_FILE).write_text(json.dumps(document), encoding="utf-8")


def load_state(cls: type[Component], path: Path) -> Any:
    """Rebuild a component that :func:`save_state` wrote."""
    path = Path(path)
    file = path / STATE_FILE
    if not file.is_file():
        raise GrnxError(f"{path} is not a saved grnx {cls.name}: {STATE_FILE} is missing.")
    document = json.loads(file.read_text(encoding="utf-8"))
    if document.get("component") != cls.name:
        raise GrnxError(f"{path} holds a {document.get('component')!r}, not {cls.name!r}.")
    component = cls(**_decode(document["params"], path))
    for name, value in document["state"].items():
        setattr(component, name, _decode(value, path))
    return component
