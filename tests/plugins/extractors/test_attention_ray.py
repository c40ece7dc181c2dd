"""Attention extraction over chunks of cells on Ray equals the in-process extraction.

A local Ray of two CPUs (``ray.init(num_cpus=2)``) runs the chunks; the reference is the same
extractor in this process (``execution.num_workers: 1``), whose Z/M aggregation
tests/plugins/extractors/test_attention.py checks against brute-force loops over cells.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from grnx_core import CellSample, DataError, DataRoles, RunContext, TokenizedCells
from grnx_core.recipe import ExecutionSettings
from grnx_plugins.extractors._attention_chunks import chunk_cells, uses_ray
from grnx_plugins.extractors.attention import AttentionExtractor


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tokens(n_cells=24, n_genes=10, seed=0):
    """Cells of 2..8 random genes with values, half labelled AD (those always hold G1)."""
    rng = np.random.default_rng(seed)
    vocabulary = ["<pad>"] + [f"G{i}" for i in range(1, n_genes + 1)]
    ids, offsets, labels = [], [0], []
    for cell in range(n_cells):
        genes = rng.choice(np.arange(2, n_genes + 1), int(rng.integers(2, 8)), replace=False)
        if cell % 2 == 0:
            genes = np.r_[1, genes]
        ids.extend(genes)
        offsets.append(offsets[-1] + len(genes))
        labels.append("AD" if cell % 2 == 0 else "ctrl")
    return TokenizedCells(
        np.array(ids),
        np.array(offsets),
        pd.DataFrame({"label": labels}, index=[f"c{i}" for i in range(n_cells)]),
        values=rng.uniform(0.5, 2.0, len(ids)),
        vocabulary=vocabulary,
        metadata={"pad_id": 0},
    )


def _context(tokens, model, weights, **execution):
    return RunContext(
        seed=0,
        roles=DataRoles(label_key="label"),
        tokens=tokens,
        model=model,
        sample=CellSample(np.arange(tokens.n_cells), weights, n_cells_total=10 * tokens.n_cells),
        execution=ExecutionSettings(**execution),
    )


@pytest.fixture(scope="module")
def fitted():
    """A small CelluFormer fitted on the cells, and WDS-like (non-uniform) cell weights."""
    from grnx_plugins.models.celluformer import CelluFormer

    tokens = _tokens()
    weights = np.random.default_rng(1).uniform(0.1, 3.0, tokens.n_cells)
    train = SimpleNamespace(
        epochs=2, batch_size=4, learning_rate=0.003, validation_fraction=0.0, device="cpu"
    )
    context = _context(tokens, None, weights)
    context.train_settings = train
    model = CelluFormer(d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0).fit(context)
    return tokens, model, weights


@pytest.mark.parametrize(
    "params, rtol",
    [
        # one cell per batch: the same maps on both sides, so only the order of additions differs
        ({"batch_size": 1}, 1e-12),
        # batches of other cells: float32 rounding in the maps (measured 4e-7 relative)
        ({"batch_size": 3, "directed": True, "normalize": "center", "layers": [-1]}, 1e-5),
        ({"variant": "case_minus_control", "case": "AD", "normalize": "apc"}, 1e-5),
    ],
    ids=["all", "directed_center", "case_minus_control_apc"],
)
def test_chunks_on_ray_equal_the_in_process_extraction(local_ray, fitted, params, rtol, monkeypatch):
    from grnx_plugins.extractors import attention

    tokens, model, weights = fitted
    here = AttentionExtractor(**params).extract(_context(tokens, model, weights, num_workers=1))
    calls = []

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    real = attention.sums_on_ray
    monkeypatch.setattr(attention, "sums_on_ray", recorded)
    on_ray = AttentionExtractor(**params).extract(_context(tokens, model, weights, num_workers=2))
    assert len(calls) == 1 and calls[0]["num_workers"] == 2  # the chunks did go to Ray
    # the same ranked pairs, scores equal within float rounding
    pd.testing.assert_frame_equal(
        on_ray.table.drop(columns="score"), here.table.drop(columns="score"), check_exact=True
    )
    np.testing.assert_allclose(on_ray.table["score"], here.table["score"], rtol=rtol, atol=1e-12)
    assert len(here.table) > 10 and on_ray.genes == here.genes and on_ray.metadata == here.metadata


def test_a_workers_error_arrives_as_the_steps_error_naming_the_run_row(local_ray, fitted, tmp_path):
    """A model trained into NaN: the worker's DataError, with the cell's row in the run's tokens
    (not its row in the chunk)."""
    import torch

    tokens, model, weights = fitted
    model.save(tmp_path / "model")
    broken = type(model).load(tmp_path / "model")
    with torch.no_grad():
        for parameter in broken.network_.parameters():
            parameter.fill_(float("nan"))
    with pytest.raises(DataError, match=r"attention over cell 'c(\d+)' \(row \1\) holds NaN") as raised:
        AttentionExtractor().extract(_context(tokens, broken, weights, num_workers=2))
    assert "RayTaskError" not in str(raised.value)


class _UnsavableAttention:
    """An attention model without save()/load(): uniform maps over each cell's tokens."""

    token_info_ = {"special_ids": [0]}
    name = "unsavable"

    def attention(self, tokens, *, cells=None, layers=None, heads=None, batch_size=8, **options):
        from grnx_core.data_types import CellAttention

        for cell in cells:
            ids, _ = tokens.cell(int(cell))
            yield CellAttention(int(cell), np.asarray(ids), np.full((len(ids), len(ids)), 0.5, np.float32))


@pytest.mark.parametrize(
    "execution, on_ray",
    [
        ({}, False),
        ({"num_workers": 1}, False),
        ({"num_workers": 2}, True),
        ({"ray_address": "127.0.0.1:1"}, True),
    ],
)
def test_ray_is_used_for_more_than_one_worker_or_a_cluster_address(execution, on_ray):
    """Which path runs, seen through a model that cannot travel (refused before Ray starts)."""
    tokens = _tokens(n_cells=6)
    context = _context(tokens, _UnsavableAttention(), np.ones(tokens.n_cells), **execution)
    assert uses_ray(context.execute.num_workers, context.execute.ray_address) is on_ray
    if on_ray:
        with pytest.raises(DataError, match=r"has no save\(\)/load\(\).*execution.num_workers: 1"):
            AttentionExtractor().extract(context)
    else:
        assert len(AttentionExtractor().extract(context).table) > 0


def test_chunks_hold_every_cell_once_and_cells_of_every_length():
    lengths = np.array([5, 1, 4, 2, 3, 9, 7, 8, 6, 1])
    cells = np.array([0, 2, 3, 5, 6, 7, 8, 9])
    chunks = chunk_cells(cells, lengths, 3)
    assert len(chunks) == 3
    assert sorted(np.concatenate(chunks).tolist()) == sorted(cells.tolist())
    assert [len(chunk) for chunk in chunks] == [3, 3, 2]
    # dealt by length: each chunk's total within the longest cell of the others'
    totals = [int(lengths[chunk].sum()) for chunk in chunks]
    assert max(totals) - min(totals) <= lengths.max()
    assert len(chunk_cells(cells[:2], lengths, 5)) == 2  # never an empty chunk
