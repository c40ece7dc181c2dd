"""Export of TokenizedCells to the Hugging Face ``datasets`` folder Geneformer's tokenizer writes.

Geneformer's ``TranscriptomeTokenizer.tokenize_data`` saves ``Dataset.save_to_disk`` folders with
the columns ``input_ids`` (int16 lists with the V1 dictionaries, whose token ids are numpy int16;
int32 with V2's, as ``datasets`` stores them), then the custom attributes in the order of
``custom_attr_name_dict``, then ``length`` (int64, added last by its ``map``): ``create_dataset``,
lines 721-737 and 775-781 of ``geneformer/tokenizer.py`` at commit 7ec90d6 (2025-10-12; see
``rank_value``). Its classifier, embedding extractor and in silico
perturber read such a folder with ``datasets.load_from_disk``. :func:`to_geneformer_dataset`
writes the same layout with pyarrow alone: ``data-00000-of-00001.arrow`` (an Arrow IPC *stream*
with the features in the schema's ``huggingface`` metadata), ``dataset_info.json`` and
``state.json``. Rows are written a batch at a time and read from the token files with plain reads
(not memory maps), so memory stays bounded however many cells there are.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from grnx_core.atomic import atomic_path
from grnx_core.data_types import TokenizedCells
from grnx_core.errors import DataError

DATA_FILE = "data-00000-of-00001.arrow"
#: Token ids per record batch (and per read from the token file).
_BATCH_TOKENS = 4 << 20
_MAX_BATCH_CELLS = 8192
#: Geneformer's input_ids dtype per model series (V1 token ids are numpy int16 in its dictionary).
IDS_DTYPES = {"V1": np.int16, "V2": np.int32}


def _column_feature(series: pd.Series) -> tuple[Any, dict[str, Any]]:
    """The Arrow type and the ``datasets`` feature of a carried obs column (as ``Dataset.from_dict``
    infers them from the column's ``tolist()``, which Geneformer passes it)."""
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


class _TokenFiles:
    """Offsets, obs and metadata of tokens, and their ids/values read a range at a time.

    From a token folder (the layout of :meth:`TokenizedCells.save`) or a TokenizedCells; ids of a
    memory-mapped TokenizedCells are read from its file, so reading them does not map the file
    into this process (memory-mapped pages count as resident memory once touched).
    """

    def __init__(self, tokens: TokenizedCells | str | Path) -> None:
        self._arrays: dict[str, Any] = {}
        self._files: dict[str, tuple[Path, int, np.dtype]] = {}
        if isinstance(tokens, TokenizedCells):
            self.offsets, self.obs, self.metadata = tokens.offsets, tokens.obs, tokens.metadata
            self.vocabulary = tokens.vocabulary
            for name in ("input_ids", "values"):
                array = getattr(tokens, name)
                if isinstance(array, np.memmap) and array.filename is not None:
                    self._files[name] = (Path(array.filename), int(array.offset), array.dtype)
                elif array is not None:
                    self._arrays[name] = array
            return
        folder = Path(tokens)
        for required in ("input_ids.npy", "offsets.npy", "obs.parquet", "meta.json"):
            if not (folder / required).is_file():
                raise DataError(
                    f"{folder} is not a grnx token folder: {required} is missing (a token folder holds "
                    f"input_ids.npy, offsets.npy, obs.parquet and meta.json)."
                )
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        self.metadata, self.vocabulary = meta.get("metadata", {}), meta.get("vocabulary", [])
        self.offsets = np.load(folder / "offsets.npy", allow_pickle=False)
        self.obs = pd.read_parquet(folder / "obs.parquet")
        for name in ("input_ids", "values"):
            file = folder / f"{name}.npy"
            if file.is_file():
                with open(file, "rb") as handle:
                    version = np.lib.format.read_magic(handle)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    _, _, dtype = read_header(handle)
                    self._files[name] = (file, handle.tell(), dtype)

    @property
    def n_cells(self) -> int:
        return len(self.offsets) - 1

    def has(self, name: str) -> bool:
        return name in self._arrays or name in self._files

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Entries ``start:stop`` of ``input_ids`` or ``values``."""
        if name in self._arrays:
            return np.asarray(self._arrays[name][start:stop])
        file, header, dtype = self._files[name]
        with open(file, "rb") as handle:
            handle.seek(header + start * dtype.itemsize)
            out = np.fromfile(handle, dtype=dtype, count=stop - start)
        if len(out) != stop - start:
            raise DataError(f"{file} is shorter than its offsets say (truncated?); tokenise again.")
        return out


def _ids_dtype(metadata: dict[str, Any], vocabulary: list[str]) -> np.dtype:
    """Geneformer's dtype for ``input_ids``: int16 for V1 tokens, int32 for V2, int64 otherwise."""
    dtype = np.dtype(IDS_DTYPES.get(metadata.get("model_version"), np.int64))
    if len(vocabulary) - 1 > np.iinfo(dtype).max:
        raise DataError(
            f"Geneformer export: token ids reach {len(vocabulary) - 1}, more than {dtype} holds (the dtype "
            f"Geneformer's {metadata.get('model_version')} dictionaries give input_ids): these tokens do not "
            f"come from a {metadata.get('model_version')} dictionary."
        )
    return dtype


def to_geneformer_dataset(
    tokens: TokenizedCells | str | Path,
    path: str | Path,
    columns: list[str] | None = None,
    rename: dict[str, str] | None = None,
    include_values: bool = False,
) -> Path:
    """Write ``tokens`` (a TokenizedCells or a token folder) as Geneformer's ``.dataset`` folder.

    Columns: ``input_ids`` (int16 for V1 rank-value tokens, int32 for V2, as Geneformer writes
    them; int64 for tokens of other tokenizers), ``values`` (float32 lists, with
    ``include_values``, for tokenizers that carry them), the obs ``columns`` (default: all carried
    ones) renamed by ``rename`` (Geneformer's ``custom_attr_name_dict``: obs column -> dataset
    column), then ``length`` (int64). Written atomically; returns the folder.
    """
    import pyarrow as pa

    source = _TokenFiles(tokens)
    obs = source.obs
    columns = list(obs.columns) if columns is None else list(columns)
    missing = [c for c in columns if c not in obs.columns]
    if missing:
        raise DataError(
            f"Geneformer export: obs column(s) {', '.join(map(repr, missing))} are not carried in the tokens "
            f"(carried: {', '.join(map(str, obs.columns)) or 'none'}). Pass them as obs_columns to "
            f"the tokenizer's transform (in a recipe: the data roles, e.g. data.label_key)."
        )
    rename = dict(rename or {})
    unknown = sorted(set(rename) - set(columns))
    if unknown:
        raise DataError(
            f"Geneformer export: rename names {', '.join(map(repr, unknown))}, which are not exported "
            f"(columns: {', '.join(columns) or 'none'})."
        )
    names = [rename.get(c, c) for c in columns]
    reserved = {"input_ids", "length", "values"}
    clash = sorted(set(names) & reserved) or sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise DataError(
            f"Geneformer export: dataset column name(s) {clash} are taken; rename them with rename=."
        )
    if include_values and not source.has("values"):
        raise DataError("Geneformer export: include_values=True, but these tokens carry no values.")
    ids_dtype = _ids_dtype(source.metadata, source.vocabulary)
    ids_type = pa.from_numpy_dtype(ids_dtype)

    fields = [pa.field("input_ids", pa.list_(ids_type))]
    features: dict[str, Any] = {
        "input_ids": {"feature": {"dtype": ids_dtype.name, "_type": "Value"}, "_type": "Sequence"}
    }
    if include_values:
        fields.append(pa.field("values", pa.list_(pa.float32())))
        features["values"] = {"feature": {"dtype": "float32", "_type": "Value"}, "_type": "Sequence"}
    arrow_types = {}
    for column, name in zip(columns, names):
        arrow_type, feature = _column_feature(obs[column])
        arrow_types[column] = arrow_type
        fields.append(pa.field(name, arrow_type))
        features[name] = feature
    fields.append(pa.field("length", pa.int64()))
    features["length"] = {"dtype": "int64", "_type": "Value"}
    schema = pa.schema(fields).with_metadata({"huggingface": json.dumps({"info": {"features": features}})})

    offsets = np.asarray(source.offsets, dtype=np.int64)
    # A content fingerprint without a second pass over the ids: the offsets, names and cells,
    # plus a CRC of every batch of ids as it is written.
    fingerprint = hashlib.sha256()
    fingerprint.update(np.ascontiguousarray(offsets))
    fingerprint.update("\0".join(names).encode())
    fingerprint.update("\0".join(map(str, obs.index)).encode())
    path = Path(path)
    with atomic_path(path, directory=True) as folder:
        with pa.OSFile(str(folder / DATA_FILE), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            start = 0
            while start < source.n_cells:
                budget = offsets[start] + _BATCH_TOKENS
                stop = int(np.searchsorted(offsets, budget, side="right")) - 1
                stop = min(max(stop, start + 1), start + _MAX_BATCH_CELLS, source.n_cells)
                lo, hi = int(offsets[start]), int(offsets[stop])
                local_offsets = pa.array((offsets[start : stop + 1] - lo).astype(np.int32))
                ids = source.read("input_ids", lo, hi).astype(ids_dtype, copy=False)
                fingerprint.update(zlib.crc32(ids).to_bytes(4, "little"))
                arrays = [pa.ListArray.from_arrays(local_offsets, pa.array(ids, type=ids_type))]
                if include_values:
                    values = source.read("values", lo, hi).astype(np.float32, copy=False)
                    arrays.append(pa.ListArray.from_arrays(local_offsets, pa.array(values)))
                block = obs.iloc[start:stop]
                arrays += [_column_values(block[c], arrow_types[c]) for c in columns]
                arrays.append(pa.array(np.diff(offsets[start : stop + 1])))
                writer.write_batch(pa.record_batch(arrays, schema=schema))
                start = stop
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
            "_fingerprint": fingerprint.hexdigest()[:16],  # the 16-hex-digit form datasets uses
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    return path


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
