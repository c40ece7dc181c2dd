"""The restricted unpickler reads plain data and Geneformer's dictionaries, and runs nothing else."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import re

import numpy as np
import pandas as pd
import pytest

from grnx_core.errors import DataError
from grnx_core.safe_pickle import MAX_PICKLE_BYTES, load_plain_pickle


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evaluates:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w')",))


def _write(path, value, protocol=pickle.DEFAULT_PROTOCOL):
    path.write_bytes(pickle.dumps(value, protocol=protocol))
    return path


PLAIN = {
    "str": "ENSG00000141510",
    "int": -3,
    "big int": 2**80,
    "float": 0.1,
    "bool": True,
    "none": None,
    "list": [1, "a", [2.5, None]],
    "tuple": (1, ("nested",)),
    "set": {1, 2, 3},
    "frozenset": frozenset({"x"}),
    "dict": {"inner": {"k": False}},
}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_round_trips_in_every_protocol(tmp_path, protocol):
    # protocols 0-3 pickle a set as a call of set/frozenset: those globals must resolve
    assert load_plain_pickle(_write(tmp_path / "plain.pkl", PLAIN, protocol)) == PLAIN


def test_numpy_scalars_keep_their_type_and_value(tmp_path):
    values = {
        "token": np.int16(25425),
        "median": np.float32(0.7531),
        "double": np.float64(1 / 3),
        "unsigned": np.uint8(255),
        "flag": np.bool_(False),
        "complex": np.complex64(1 - 2j),
        "symbol": np.str_("ENSG00000130203"),
    }
    loaded = load_plain_pickle(_write(tmp_path / "numpy.pkl", values))
    assert loaded == values
    assert {k: type(v) for k, v in loaded.items()} == {k: type(v) for k, v in values.items()}


@pytest.mark.parametrize(
    "payload, refused_global",
    [(_RunsShell, r"(os|posix)\.system"), (_Evaluates, r"builtins\.eval")],
    ids=["os.system", "builtins.eval"],
)
def test_code_in_a_pickle_is_refused_before_it_runs(tmp_path, payload, refused_global):
    marker = tmp_path / "ran"
    path = _write(tmp_path / "token_dictionary.pkl", {"ENSG00000000003": payload(marker)})
    with pytest.raises(
        DataError, match=r"Refusing to load the token dictionary .*token_dictionary\.pkl"
    ) as error:
        load_plain_pickle(path, what="token dictionary")
    assert not marker.exists()
    message = str(error.value)
    assert re.search(refused_global, message), message
    assert "convert it to TSV or JSON" in message


def test_classes_arrays_and_object_dtypes_are_refused(tmp_path):
    refused = {
        "timestamp": (pd.Timestamp(0), "pandas"),
        "array": (np.arange(3), "numpy._core"),
        "structured scalar": (np.zeros(1, dtype=[("a", "i4")])[0], "dtype('V4')"),
    }
    for name, (value, named) in refused.items():
        path = _write(tmp_path / f"{name}.pkl", {"gene": value})
        with pytest.raises(DataError, match="Refusing to load") as error:
            load_plain_pickle(path)
        assert named in str(error.value) and str(path) in str(error.value), name


class _WithPersistentIds(pickle.Pickler):
    def persistent_id(self, obj):
        return "row-7" if obj == "external" else None


def _write_with_persistent_id(path):
    buffer = io.BytesIO()
    _WithPersistentIds(buffer, protocol=2).dump({"TP53": "external"})
    path.write_bytes(buffer.getvalue())
    return path


def test_persistent_ids_are_refused(tmp_path):
    path = _write_with_persistent_id(tmp_path / "persistent.pkl")
    with pytest.raises(DataError, match=r"persistent\.pkl: it refers to a persistent id \('row-7'\)"):
        load_plain_pickle(path)


def test_oversize_files_are_refused_before_reading(tmp_path):
    path = tmp_path / "huge.pkl"
    with open(path, "wb") as handle:  # sparse: the size is there, the bytes are not written
        handle.truncate(MAX_PICKLE_BYTES + 1)
    with pytest.raises(DataError, match=r"huge\.pkl: it is 268,435,457 bytes .* at most 268,435,456"):
        load_plain_pickle(path)
    small = _write(tmp_path / "small.pkl", list(range(100)))
    with pytest.raises(DataError, match="at most 64 bytes"):
        load_plain_pickle(small, max_bytes=64)


def test_truncated_and_missing_files_say_what_is_wrong(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps(PLAIN)[:30])
    with pytest.raises(DataError, match=r"Could not read the pickle .*cut\.pkl as a pickle: .*truncated"):
        load_plain_pickle(path)
    with pytest.raises(DataError, match=r"Could not read the pickle .*absent\.pkl"):
        load_plain_pickle(tmp_path / "absent.pkl")


def test_both_gene_dictionary_readers_use_it(tmp_path):
    """The tokenizers' dictionaries and map_gene_ids' table refuse the same pickles."""
    from grnx_plugins.preprocess.map_gene_ids import load_mapping_table
    from grnx_plugins.tokenizers._dictionaries import load_dictionary

    path = _write_with_persistent_id(tmp_path / "names.pkl")
    with pytest.raises(DataError, match="persistent id"):
        load_dictionary(path, "token dictionary")
    with pytest.raises(DataError, match="persistent id"):
        load_mapping_table(str(path), "gene_symbol", "ensembl_id", "preprocessor 'map_gene_ids'")


def test_reads_real_geneformer_dictionaries_as_pickle_does(shared_data):
    """Reference: the standard unpickler on the same (trusted) files."""
    files = sorted((shared_data / "geneformer").glob("*/*.pkl"))
    if not files:
        pytest.skip(f"no Geneformer dictionaries under {shared_data / 'geneformer'}")
    for path in files:
        with open(path, "rb") as handle:
            expected = pickle.load(handle)
        loaded = load_plain_pickle(path, what="Geneformer dictionary")
        assert loaded == expected, path
        assert {type(v) for v in loaded.values()} == {type(v) for v in expected.values()}, path
    token_dictionary = load_plain_pickle(shared_data / "geneformer" / "v1" / "token_dictionary.pkl")
    # /work/shared/data/README.md: 25,426 entries, <pad>=0, <mask>=1, values numpy int16
    assert len(token_dictionary) == 25_426
    assert token_dictionary["<pad>"] == 0 and token_dictionary["<mask>"] == 1
    genes = [value for key, value in token_dictionary.items() if key.startswith("ENSG")]
    assert len(genes) == 25_424 and all(isinstance(value, np.int16) for value in genes)
