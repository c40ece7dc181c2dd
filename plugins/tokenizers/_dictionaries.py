"""Reading gene dictionaries (token ids, medians, id mappings) from pickle, TSV or JSON files safely.

Geneformer distributes its dictionaries as Python pickles; they are read with
:func:`grnx_core.safe_pickle.load_plain_pickle`, which runs no code from the file. The result must
be a flat dict of str -> str/int/float.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from grnx_core import safe_pickle
from grnx_core.errors import DataError


def load_plain_pickle(path: Path, what: str = "gene dictionary") -> dict:
    """A pickle holding only a dict of str -> str/int/float (numpy scalars become Python numbers)."""
    return _check_plain_dict(safe_pickle.load_plain_pickle(path, what=what), path)


def _check_plain_dict(loaded: object, path: Path) -> dict:
    if not isinstance(loaded, dict):
        raise DataError(f"{path} holds a {type(loaded).__name__}, but a gene dictionary must be a dict.")
    checked = {}
    for key, value in loaded.items():
        if not isinstance(key, str):
            raise DataError(f"{path}: dictionary keys must be strings, found {type(key).__name__} {key!r}.")
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise DataError(
                f"{path}: value for {key!r} is a {type(value).__name__}; expected str, int or float."
            )
        checked[key] = value
    return checked


def load_dictionary(path: str | Path, what: str) -> dict:
    """A gene dictionary from ``.pkl`` (restricted unpickler), ``.json`` or ``.tsv``/``.csv``.

    TSV/CSV files have a header row and two columns: key, value (as in the conversions of
    Geneformer's dictionaries). Numeric values become int when every value is integral.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(
            f"The {what} file {str(path)!r} does not exist (looked at {path.resolve()}). Fix the path in "
            f"the tokenizer's parameters."
        )
    suffix = path.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        return load_plain_pickle(path, what)
    if suffix == ".json":
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise DataError(f"{path} is not valid JSON: {error}") from error
        return _check_plain_dict(loaded, path)
    if suffix in (".tsv", ".csv", ".txt"):
        return _load_two_column_table(path, "," if suffix == ".csv" else "\t")
    raise DataError(f"The {what} file {path} has suffix {suffix!r}; expected .pkl, .json, .tsv or .csv.")


def _load_two_column_table(path: Path, sep: str) -> dict:
    import pandas as pd

    table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    if table.shape[1] != 2:
        raise DataError(
            f"{path} has {table.shape[1]} columns ({', '.join(table.columns)}); a gene dictionary table "
            f"needs exactly two: key and value."
        )
    keys = table.iloc[:, 0].tolist()
    raw = table.iloc[:, 1]
    if pd.to_numeric(raw, errors="coerce").notna().all():
        if raw.str.fullmatch(r"[+-]?\d+").all():
            return dict(zip(keys, raw.astype(np.int64).tolist()))
        # numpy's string -> float64 is correctly rounded (pandas' fast parser can be 1 ulp off).
        return dict(zip(keys, raw.to_numpy().astype(np.float64).tolist()))
    return dict(zip(keys, raw.tolist()))


def find_dictionary(folder: str | Path, stem_prefix: str, what: str) -> Path | None:
    """The one file in ``folder`` whose name starts with ``stem_prefix`` (.pkl preferred to .tsv/.json)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"Dictionary folder {str(folder)!r} does not exist (looked at {folder.resolve()}).")
    by_stem: dict[str, list[Path]] = {}
    for candidate in sorted(folder.iterdir()):
        if candidate.name.startswith(stem_prefix) and candidate.suffix.lower() in (".pkl", ".tsv", ".json"):
            by_stem.setdefault(candidate.stem, []).append(candidate)
    if not by_stem:
        return None
    if len(by_stem) > 1:
        raise DataError(
            f"{folder} holds several {what} files ({', '.join(sorted(by_stem))}); name the one to use "
            f"in the tokenizer's parameters."
        )
    (files,) = by_stem.values()
    rank = {".pkl": 0, ".json": 1, ".tsv": 2}
    return min(files, key=lambda p: rank[p.suffix.lower()])
