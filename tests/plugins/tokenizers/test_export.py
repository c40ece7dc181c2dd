"""Geneformer-compatible `.dataset` export: the folder layout `datasets.load_from_disk` reads."""

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

    monkeypatch.setattr(export, "_BATCH_CELLS", 7)  # several record batches
    path = to_geneformer_dataset(tokens, tmp_path / "cells.dataset", rename={"cell_type": "cell_types"})
    assert sorted(p.name for p in path.iterdir()) == sorted([DATA_FILE, "dataset_info.json", "state.json"])
    state = json.loads((path / "state.json").read_text())
    assert state["_data_files"] == [{"filename": DATA_FILE}] and state["_split"] is None
    assert len(state["_fingerprint"]) == 16
    info = json.loads((path / "dataset_info.json").read_text())
    assert info["features"]["input_ids"] == {
        "feature": {"dtype": "int64", "_type": "Value"},
        "_type": "Sequence",
    }
    assert info["features"]["cell_types"] == {"dtype": "string", "_type": "Value"}
    assert info["features"]["donor"]["dtype"] == "int64" and info["features"]["disease"]["dtype"] == "bool"
    # An Arrow IPC *stream* (what datasets memory-maps), features repeated in the schema metadata.
    with pa.memory_map(str(path / DATA_FILE)) as source:
        table = pa.ipc.open_stream(source).read_all()
    assert table.schema.field("input_ids").type == pa.list_(pa.int64())
    assert json.loads(table.schema.metadata[b"huggingface"])["info"]["features"] == info["features"]
    rows = read_geneformer_dataset(path)
    assert list(rows.columns) == ["input_ids", "length", "cell_types", "donor", "age", "disease"]
    for i in range(tokens.n_cells):
        assert rows["input_ids"][i].tolist() == tokens.cell(i)[0].tolist()
        assert rows["length"][i] == tokens.lengths[i]
    assert rows["cell_types"].tolist() == tokens.obs["cell_type"].astype(str).tolist()
    np.testing.assert_array_equal(rows["age"], tokens.obs["age"])


def test_values_column_and_errors(tokens, tmp_path):
    path = to_geneformer_dataset(tokens, tmp_path / "v.dataset", columns=["donor"], include_values=True)
    rows = read_geneformer_dataset(path)
    assert list(rows.columns) == ["input_ids", "length", "values", "donor"]
    np.testing.assert_array_equal(np.concatenate(rows["values"].to_list()), tokens.values)
    with pytest.raises(DataError, match="not carried"):
        to_geneformer_dataset(tokens, tmp_path / "x.dataset", columns=["label"])
    with pytest.raises(DataError, match="taken"):
        to_geneformer_dataset(tokens, tmp_path / "x.dataset", rename={"donor": "length"})


def test_loads_with_hugging_face_datasets(tokens, tmp_path):
    datasets = pytest.importorskip("datasets", reason="the datasets package is not installed")
    path = to_geneformer_dataset(tokens, tmp_path / "cells.dataset")
    loaded = datasets.load_from_disk(str(path))
    assert loaded.num_rows == tokens.n_cells
    assert loaded[3]["input_ids"] == tokens.cell(3)[0].tolist()
    assert loaded[3]["length"] == tokens.lengths[3]
    assert loaded.features["cell_type"].dtype == "string"


def test_rank_value_tokens_export(pbmc3k, geneformer_dir, tmp_path):
    from grnx_plugins.tokenizers.rank_value import RankValue

    out = RankValue(model_version="V2", dictionary_dir=str(geneformer_dir / "v2")).transform(
        pbmc3k, obs_columns=["cell_type", "donor"]
    )
    rows = read_geneformer_dataset(to_geneformer_dataset(out, tmp_path / "pbmc.dataset"))
    assert len(rows) == pbmc3k.n_obs
    assert all(ids[0] == 2 and ids[-1] == 3 for ids in rows["input_ids"])
    assert rows["length"].tolist() == out.lengths.tolist()
