"""Geneformer-compatible `.dataset` export: the folder `datasets.load_from_disk` reads, with the
columns and dtypes of Geneformer's ``tokenize_data`` (``[input_ids, <custom attributes>, length]``,
input_ids int16 for V1 tokens and int32 for V2, as printed by Geneformer's own output)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from grnx_core import DataError, TokenizedCells
from grnx_plugins.tokenizers.export import DATA_FILE, read_geneformer_dataset, to_geneformer_dataset


@pytest.fixture()
def tokens() -> TokenizedCells:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 25)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(["B", "T"], 25)),
            "donor": rng.integers(0, 3, 25),
            "age": rng.random(25),
            "disease": rng.random(25) > 0.5,
        },
        index=[f"cell{i}" for i in range(25)],
    )
    return TokenizedCells(
        input_ids=rng.integers(4, 20_000, offsets[-1]),
        offsets=offsets,
        obs=obs,
        values=rng.random(offsets[-1]).astype(np.float32),
        vocabulary=["<pad>"],
        metadata={"pad_id": 0},
    )


def test_folder_layout_and_rows(tokens, tmp_path, monkeypatch):
    import grnx_plugins.tokenizers.export as export

    monkeypatch.setattr(export, "_BATCH_TOKENS", 50)  # several record batches
    path = to_geneformer_dataset(tokens, tmp_path / "cells.dataset", rename={"cell_type": "cell_types"})
    assert sorted(p.name for p in path.iterdir()) == sorted([DATA_FILE, "dataset_info.json", "state.json"])
    state = json.loads((path / "state.json").read_text())
    assert state["_data_files"] == [{"filename": DATA_FILE}] and state["_split"] is None
    assert len(state["_fingerprint"]) == 16
    info = json.loads((path / "dataset_info.json").read_text())
    # Tokens of a tokenizer other than rank_value keep int64 ids.
    assert info["features"]["input_ids"] == {
        "feature": {"dtype": "int64", "_type": "Value"},
        "_type": "Sequence",
    }
    assert info["features"]["cell_types"] == {"dtype": "string", "_type": "Value"}
    assert info["features"]["donor"]["dtype"] == "int64" and info["features"]["disease"]["dtype"] == "bool"
    # An Arrow IPC *stream* (what datasets memory-maps), features repeated in the schema metadata.
    with pa.memory_map(str(path / DATA_FILE)) as source:
        reader = pa.ipc.open_stream(source)
        batches = list(reader)
    table = pa.Table.from_batches(batches)
    assert len(batches) > 3
    assert table.schema.field("input_ids").type == pa.list_(pa.int64())
    assert json.loads(table.schema.metadata[b"huggingface"])["info"]["features"] == info["features"]
    rows = read_geneformer_dataset(path)
    # Geneformer's column order: input_ids, the custom attributes, then length.
    assert list(rows.columns) == ["input_ids", "cell_types", "donor", "age", "disease", "length"]
    assert list(info["features"]) == list(rows.columns)
    for i in range(tokens.n_cells):
        assert rows["input_ids"][i].tolist() == tokens.cell(i)[0].tolist()
        assert rows["length"][i] == tokens.lengths[i]
    assert rows["cell_types"].tolist() == tokens.obs["cell_type"].astype(str).tolist()
    np.testing.assert_array_equal(rows["age"], tokens.obs["age"])


@pytest.mark.parametrize(("version", "dtype"), [("V1", np.int16), ("V2", np.int32)])
def test_geneformer_dtypes_and_a_token_folder_give_the_same_dataset(tokens, tmp_path, version, dtype):
    tokens.metadata = {"model_version": version, "tokenizer": "rank_value"}
    tokens.vocabulary = ["<pad>"] * 20_275
    from_memory = to_geneformer_dataset(tokens, tmp_path / "memory.dataset")
    tokens.save(tmp_path / "tokens")
    from_folder = to_geneformer_dataset(tmp_path / "tokens", tmp_path / "folder.dataset")
    mapped = TokenizedCells.load(tmp_path / "tokens", mmap=True)
    from_mapped = to_geneformer_dataset(mapped, tmp_path / "mapped.dataset")
    expected = read_geneformer_dataset(from_memory)
    assert expected["input_ids"][0].dtype == dtype
    info = json.loads((from_memory / "dataset_info.json").read_text())
    assert info["features"]["input_ids"]["feature"]["dtype"] == np.dtype(dtype).name
    for other in (from_folder, from_mapped):
        rows = read_geneformer_dataset(other)
        assert list(rows.columns) == list(expected.columns)
        for column in expected.columns:
            assert [np.asarray(v).tolist() for v in rows[column]] == [
                np.asarray(v).tolist() for v in expected[column]
            ]
        assert (other / "state.json").read_text() == (from_memory / "state.json").read_text()
    # V1 ids beyond int16 are not V1 tokens.
    tokens.metadata = {"model_version": "V1"}
    tokens.vocabulary = ["<pad>"] * 40_000
    with pytest.raises(DataError, match="more than int16 holds"):
        to_geneformer_dataset(tokens, tmp_path / "too_big.dataset")


def test_values_column_and_errors(tokens, tmp_path):
    path = to_geneformer_dataset(tokens, tmp_path / "v.dataset", columns=["donor"], include_values=True)
    rows = read_geneformer_dataset(path)
    assert list(rows.columns) == ["input_ids", "values", "donor", "length"]
    np.testing.assert_array_equal(np.concatenate(rows["values"].to_list()), tokens.values)
    with pytest.raises(DataError, match="not carried"):
        to_geneformer_dataset(tokens, tmp_path / "x.dataset", columns=["label"])
    with pytest.raises(DataError, match="taken"):
        to_geneformer_dataset(tokens, tmp_path / "x.dataset", rename={"donor": "length"})
    with pytest.raises(DataError, match="rename names 'label', which are not exported"):
        to_geneformer_dataset(tokens, tmp_path / "x.dataset", rename={"label": "y"})
    with pytest.raises(DataError, match="is not a grnx token folder: input_ids.npy is missing"):
        to_geneformer_dataset(tmp_path, tmp_path / "x.dataset")


def test_loads_with_hugging_face_datasets(tokens, tmp_path):
    """load_from_disk, then what Geneformer's classifier and perturber do with the dataset
    (perturber_utils.load_and_filter / filter_by_dict / downsample_and_sort / slice_by_inds_to_perturb,
    classifier_utils.rename_cols / label_classes): filter, shuffle, select, sort by length, rename, map."""
    datasets = pytest.importorskip("datasets", reason="the datasets package is not installed")
    tokens.metadata = {"model_version": "V2"}
    tokens.vocabulary = ["<pad>"] * 20_275
    path = to_geneformer_dataset(tokens, tmp_path / "cells.dataset")
    loaded = datasets.load_from_disk(str(path))
    assert loaded.num_rows == tokens.n_cells
    assert loaded.column_names == ["input_ids", "cell_type", "donor", "age", "disease", "length"]
    assert loaded.features["input_ids"].feature.dtype == "int32"
    assert loaded[3]["input_ids"] == tokens.cell(3)[0].tolist()
    assert loaded[3]["length"] == tokens.lengths[3]
    assert loaded.features["cell_type"].dtype == "string"
    kept = loaded.filter(lambda example: example["cell_type"] in ["B"])
    assert kept.num_rows == int((tokens.obs["cell_type"] == "B").sum())
    ordered = kept.shuffle(seed=42).select(range(5)).sort("length", reverse=True)
    assert ordered["length"] == sorted(ordered["length"], reverse=True)
    labelled = ordered.rename_column("cell_type", "label").map(lambda example: {"label": 0})
    assert labelled.column_names[:2] == ["input_ids", "label"] and set(labelled["label"]) == {0}
    with_token = loaded.filter(lambda example: int(tokens.input_ids[0]) in set(example["input_ids"]))
    assert with_token.num_rows >= 1


def test_rank_value_tokens_export(pbmc3k, geneformer_dir, tmp_path):
    from grnx_plugins.tokenizers.rank_value import RankValue

    out = RankValue(model_version="V2", dictionary_dir=str(geneformer_dir / "v2")).transform(
        pbmc3k, obs_columns=["cell_type", "donor"]
    )
    path = RankValue.export_tokens(out, tmp_path / "pbmc.dataset", rename={"cell_type": "cell_types"})
    rows = read_geneformer_dataset(path)
    assert list(rows.columns) == ["input_ids", "cell_types", "donor", "length"]
    assert len(rows) == pbmc3k.n_obs
    assert all(ids[0] == 2 and ids[-1] == 3 and ids.dtype == np.int32 for ids in rows["input_ids"])
    assert rows["length"].tolist() == out.lengths.tolist()
    with pytest.raises(DataError, match="exports tokens as 'geneformer' only"):
        RankValue.export_tokens(out, tmp_path / "x", format="loom")
