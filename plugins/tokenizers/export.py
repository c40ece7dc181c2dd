"""Export of TokenizedCells to a Hugging Face ``datasets`` folder that Geneformer's tools load.

Geneformer's classifier, embedding extractor and in silico perturber read a tokenised corpus with
``datasets.load_from_disk(path)`` and use the columns ``input_ids`` (list of int64), ``length``
(int64) and label columns. :func:`to_geneformer_dataset` writes that folder with pyarrow alone, in
the layout ``Dataset.save_to_disk`` produces: ``data-00000-of-00001.arrow`` (an Arrow IPC
*stream* with the features in the schema's ``huggingface`` metadata), ``dataset_info.json`` and
``state.json``. Rows are written a batch at a time, so memory stays bounded for large corpora.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from grnx_core.atomic import atomic_path
from grnx_core.data_types import TokenizedCells
from grnx_core.errors import DataError

DATA_FILE = "data-00000-of-00001.arrow"
_BATCH_CELLS = 8192


def _column_feature(series: pd.Series) -> tuple[Any, dict[str, Any]]:
    """The Arrow type and the ``datasets`` feature of a carried obs column."""
    import pyarrow as pa

    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        dtype = series.cat.categories.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return pa.bool_(), {"dtype": "bool", "_type": "Value"}
    if pd.api.types.is_integer_dtype(dtype):
        return pa.int64(), {"dtype": "int64", "_type": "Value"}
    if pd.api.types.is_float_dtype(dtype):
        return pa.float64(), {"dtype": "float64", "_type": "Value"}
    return pa.string(), {"dtype": "string", "_type": "Value"}


def _column_values(series: pd.Series, arrow_type: Any) -> Any:
    import pyarrow as pa

    if isinstance(series.dtype, pd.CategoricalDtype):
        series = series.astype(series.cat.categories.dtype if arrow_type != pa.string() else object)
    if arrow_type == pa.string():
        values = [None if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v) for v in series]
        return pa.array(values, type=pa.string())
    return pa.array(series.to_numpy(), type=arrow_type)


def to_geneformer_dataset(
    tokens: TokenizedCells,
    path: str | Path,
    columns: list[str] | None = None,
    rename: dict[str, str] | None = None,
    include_values: bool = False,
) -> Path:
    """Write ``tokens`` as a ``datasets`` folder with ``input_ids``, ``length`` and obs columns.

    ``columns``: obs columns to add (default: all carried ones); ``rename`` maps obs column ->
    dataset column (Geneformer's ``custom_attr_name_dict``). ``include_values`` adds the token
    values as a ``values`` column (float32 lists) for tokenizers that carry them. Written
    atomically; returns the folder.
    """
    import pyarrow as pa

    columns = list(tokens.obs.columns) if columns is None else list(columns)
    missing = [c for c in columns if c not in tokens.obs.columns]
    if missing:
        raise DataError(
            f"Geneformer export: obs column(s) {', '.join(map(repr, missing))} are not carried in the tokens "
            f"(carried: {', '.join(map(str, tokens.obs.columns)) or 'none'}). Pass them as obs_columns to "
            f"the tokenizer's transform."
        )
    rename = dict(rename or {})
    names = [rename.get(c, c) for c in columns]
    reserved = {"input_ids", "length", "values"}
    clash = sorted(set(names) & reserved) or sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise DataError(
            f"Geneformer export: dataset column name(s) {clash} are taken; rename them with rename=."
        )
    if include_values and tokens.values is None:
        raise DataError("Geneformer export: include_values=True, but these tokens carry no values.")

    fields = [pa.field("input_ids", pa.list_(pa.int64())), pa.field("length", pa.int64())]
    features: dict[str, Any] = {
        "input_ids": {"feature": {"dtype": "int64", "_type": "Value"}, "_type": "Sequence"},
        "length": {"dtype": "int64", "_type": "Value"},
    }
    if include_values:
        fields.append(pa.field("values", pa.list_(pa.float32())))
        features["values"] = {"feature": {"dtype": "float32", "_type": "Value"}, "_type": "Sequence"}
    arrow_types = {}
    for column, name in zip(columns, names):
        arrow_type, feature = _column_feature(tokens.obs[column])
        arrow_types[column] = arrow_type
        fields.append(pa.field(name, arrow_type))
        features[name] = feature
    fingerprint = _fingerprint(tokens, names)
    schema = pa.schema(fields).with_metadata(
        {"huggingface": json.dumps({"info": {"features": features}, "fingerprint": fingerprint})}
    )

    path = Path(path)
    with atomic_path(path, directory=True) as folder:
        with pa.OSFile(str(folder / DATA_FILE), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for start in range(0, tokens.n_cells, _BATCH_CELLS):
                stop = min(start + _BATCH_CELLS, tokens.n_cells)
                lo, hi = int(tokens.offsets[start]), int(tokens.offsets[stop])
                local_offsets = pa.array((tokens.offsets[start : stop + 1] - lo).astype(np.int32))
                arrays = [
                    pa.ListArray.from_arrays(
                        local_offsets, pa.array(np.asarray(tokens.input_ids[lo:hi], dtype=np.int64))
                    ),
                    pa.array(np.diff(tokens.offsets[start : stop + 1]).astype(np.int64)),
                ]
                if include_values:
                    arrays.append(
                        pa.ListArray.from_arrays(
                            local_offsets, pa.array(np.asarray(tokens.values[lo:hi], dtype=np.float32))
                        )
                    )
                block = tokens.obs.iloc[start:stop]
                arrays += [_column_values(block[c], arrow_types[c]) for c in columns]
                writer.write_batch(pa.record_batch(arrays, schema=schema))
        info = {
            "builder_name": None,
            "citation": "",
            "config_name": None,
            "dataset_name": None,
            "dataset_size": None,
            "description": "Tokenised by grnx",
            "download_checksums": None,
            "download_size": None,
            "features": features,
            "homepage": "",
            "license": "",
            "post_processed": None,
            "post_processing_size": None,
            "size_in_bytes": None,
            "splits": None,
            "supervised_keys": None,
            "version": None,
        }
        (folder / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        state = {
            "_data_files": [{"filename": DATA_FILE}],
            "_fingerprint": fingerprint,
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    return path


def _fingerprint(tokens: TokenizedCells, names: list[str]) -> str:
    """A content hash in the 16-hex-digit form ``datasets`` uses for fingerprints."""
    digest = hashlib.sha256()
    # Hashed through the buffer protocol: no copy of the (possibly memory-mapped) ids.
    digest.update(np.ascontiguousarray(tokens.offsets))
    digest.update(np.ascontiguousarray(tokens.input_ids))
    digest.update("\0".join(names).encode())
    digest.update("\0".join(map(str, tokens.obs.index)).encode())
    return digest.hexdigest()[:16]


def read_geneformer_dataset(path: str | Path) -> pd.DataFrame:
    """The rows of a ``datasets`` folder as a DataFrame (for checks without ``datasets`` installed)."""
    import pyarrow as pa

    path = Path(path)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    tables = []
    for entry in state["_data_files"]:
        with pa.memory_map(str(path / entry["filename"])) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return pa.concat_tables(tables).to_pandas()
