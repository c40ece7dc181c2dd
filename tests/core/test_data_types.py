"""Core value types: Interactions, TokenizedCells, CellSample, GroundTruth, atomic writes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from grnx_core import CellSample, DataError, GroundTruth, Interactions, TokenizedCells
from grnx_core.atomic import atomic_path

GENES = ["a", "b", "c", "d"]
SCORES = np.array(
    [
        [0.0, 0.9, -0.5, 0.1],
        [0.2, 0.0, 0.3, np.nan],
        [-0.7, 0.4, 0.0, 0.6],
        [0.1, 0.8, -0.2, 0.0],
    ]
)


def test_undirected_from_matrix_uses_the_upper_triangle():
    interactions = Interactions.from_matrix(SCORES, GENES, directed=False, extractor="x", rank_by="abs")
    table = interactions.table
    assert list(zip(table["source"], table["target"])) == [
        ("a", "b"),
        ("c", "d"),
        ("a", "c"),
        ("b", "c"),
        ("a", "d"),
    ]  # (b, d) is NaN and dropped
    assert list(table["sign"]) == [1, 1, -1, 1, 1]
    assert list(interactions.pair_ids()) == ["a|b", "c|d", "a|c", "b|c", "a|d"]


def test_directed_from_matrix_and_top_k_agree_with_the_full_ranking():
    full = Interactions.from_matrix(SCORES, GENES, directed=True, extractor="x")
    assert len(full) == 11  # 12 off-diagonal entries, one NaN
    assert (np.diff(full.table["score"]) <= 0).all()
    top = Interactions.from_matrix(SCORES, GENES, directed=True, extractor="x", top_k=4)
    assert top.table.equals(full.table.head(4))


def test_ties_keep_matrix_order():
    tied = np.ones((3, 3))
    table = Interactions.from_matrix(tied, ["x", "y", "z"], directed=False, extractor="t").table
    assert list(zip(table["source"], table["target"])) == [("x", "y"), ("x", "z"), ("y", "z")]


def test_interactions_round_trip_and_exports(tmp_path):
    interactions = Interactions.from_matrix(
        SCORES, GENES, directed=False, extractor="x", rank_by="abs", metadata={"n_cells": 7}
    )
    interactions.save(tmp_path / "i.parquet")
    loaded = Interactions.load(tmp_path / "i.parquet")
    assert loaded.table.equals(interactions.table)
    assert (loaded.directed, loaded.extractor, loaded.genes, loaded.metadata) == (
        False,
        "x",
        GENES,
        {"n_cells": 7},
    )
    # Exports to BEELINE, varp and openproblems files: grnx_core.exports (tests/core/test_exports.py).


def test_tokenized_cells_subset_pad_and_round_trip(tmp_path):
    tokens = TokenizedCells(
        input_ids=np.array([5, 6, 7, 8, 9, 10]),
        offsets=np.array([0, 3, 4, 6]),
        values=np.array([1, 2, 3, 4, 5, 6], dtype=float),
        obs=pd.DataFrame({"label": ["AD", "ct", "AD"]}, index=["c0", "c1", "c2"]),
        vocabulary=["<pad>"] + [f"g{i}" for i in range(10)],
        metadata={"pad_id": 0},
    )
    subset = tokens.subset(np.array([2, 0]))
    assert subset.input_ids.tolist() == [9, 10, 5, 6, 7] and subset.obs.index.tolist() == ["c2", "c0"]
    ids, values, mask = tokens.padded(np.array([0, 1]))
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[True] * 3, [True, False, False]]
    assert values.tolist() == [[1, 2, 3], [4, 0, 0]]
    tokens.save(tmp_path / "tokens")
    loaded = TokenizedCells.load(tmp_path / "tokens")
    assert loaded.input_ids.tolist() == tokens.input_ids.tolist() and loaded.metadata == {"pad_id": 0}
    assert loaded.obs.equals(tokens.obs)
    with pytest.raises(ValueError, match="offsets must start at 0"):
        TokenizedCells(input_ids=np.arange(3), offsets=np.array([0, 2]), obs=pd.DataFrame(index=["c"]))


def test_cell_sample_round_trip(tmp_path):
    sample = CellSample(np.array([3, 1]), np.array([0.25, 0.75]), 10, {"method": "wds", "n_hashes": 200})
    sample.save(tmp_path / "s.npz")
    loaded = CellSample.load(tmp_path / "s.npz")
    assert loaded.indices.tolist() == [3, 1] and loaded.weights.tolist() == [0.25, 0.75]
    assert loaded.info == {"method": "wds", "n_hashes": 200} and loaded.n_cells_total == 10


def test_ground_truth_drops_self_loops_and_duplicates():
    edges = pd.DataFrame({"source": ["a", "b", "a", "c"], "target": ["b", "a", "a", "d"]})
    undirected = GroundTruth(edges, directed=False, name="t")
    assert undirected.pair_set() == {"a|b", "c|d"}
    assert GroundTruth(edges, directed=True, name="t").pair_set() == {"a|b", "b|a", "c|d"}
    with pytest.raises(DataError, match="needs columns 'source' and 'target'"):
        GroundTruth(pd.DataFrame({"Gene1": ["a"], "Gene2": ["b"]}), directed=False, name="bad")


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with atomic_path(tmp_path / "folder", directory=True) as folder:
        (folder / "a").write_text("1")
    assert (tmp_path / "folder" / "a").read_text() == "1"
