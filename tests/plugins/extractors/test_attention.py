"""Attention extractor: its Z/M aggregation equals a brute-force loop over cells and gene pairs."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from grnx_core import CellSample, DataError, DataRoles, RunContext, TokenizedCells
from grnx_plugins.extractors.attention import AttentionExtractor


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tokens(n_cells=16, n_genes=9, seed=0):
    rng = np.random.default_rng(seed)
    vocabulary = ["<pad>"] + [f"G{i}" for i in range(1, n_genes + 1)]
    ids, values, offsets, labels = [], [], [0], []
    for cell in range(n_cells):
        genes = rng.choice(np.arange(2, n_genes + 1), int(rng.integers(2, 7)), replace=False)
        if cell % 2 == 0:
            genes = np.r_[1, genes]
        ids.extend(genes)
        values.extend(rng.uniform(0.5, 2.0, len(genes)))
        offsets.append(offsets[-1] + len(genes))
        labels.append("AD" if cell % 2 == 0 else "ctrl")
    obs = pd.DataFrame({"label": labels}, index=[f"c{i}" for i in range(n_cells)])
    return TokenizedCells(
        np.array(ids),
        np.array(offsets),
        obs,
        values=np.array(values),
        vocabulary=vocabulary,
        metadata={"pad_id": 0},
    )


@pytest.fixture(scope="module")
def run():
    from grnx_plugins.models.celluformer import CelluFormer

    tokens = _tokens()
    train = SimpleNamespace(
        epochs=3, batch_size=4, learning_rate=0.003, validation_fraction=0.0, device="cpu"
    )
    weights = np.random.default_rng(1).uniform(0.1, 3.0, tokens.n_cells)
    context = RunContext(
        seed=0,
        roles=DataRoles(label_key="label"),
        tokens=tokens,
        train_settings=train,
        sample=CellSample(np.arange(100, 100 + tokens.n_cells), weights, n_cells_total=500),
    )
    context.model = CelluFormer(d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0).fit(context)
    return context


def _brute_force(context, cells, weights, directed, layers=None):
    """Z and M accumulated pair by pair, cell by cell, from maps computed one cell at a time."""
    tokens = context.tokens
    z, m = defaultdict(float), defaultdict(float)
    for cell in cells:
        (cell_map,) = context.model.attention(tokens, cells=[cell], layers=layers, batch_size=1)
        genes = [tokens.vocabulary[i] for i in cell_map.token_ids]
        for a, gene_a in enumerate(genes):
            for b, gene_b in enumerate(genes):
                if a != b:
                    z[gene_a, gene_b] += weights[cell] * float(cell_map.attention[a, b])
                    m[gene_a, gene_b] += weights[cell]
    if directed:
        return {pair: z[pair] / m[pair] for pair in z}
    return {frozenset(pair): (z[pair] + z[pair[::-1]]) / (m[pair] + m[pair[::-1]]) for pair in z}


def _as_dict(interactions, directed):
    key = (lambda s, t: (s, t)) if directed else (lambda s, t: frozenset((s, t)))
    return {
        key(s, t): v for s, t, v in interactions.table[["source", "target", "score"]].itertuples(index=False)
    }


@pytest.mark.parametrize("directed", [False, True])
@pytest.mark.parametrize("weighting", ["sample", "uniform"])
def test_all_cells_match_brute_force(run, directed, weighting):
    result = AttentionExtractor(directed=directed, weighting=weighting, batch_size=1).extract(run)
    weights = run.sample.weights if weighting == "sample" else np.ones(run.tokens.n_cells)
    expected = _brute_force(run, range(run.tokens.n_cells), weights, directed)
    got = _as_dict(result, directed)
    assert got.keys() == expected.keys()
    for pair, value in expected.items():
        assert got[pair] == pytest.approx(value, rel=1e-9, abs=1e-12)
    scores = result.table["score"].to_numpy()
    assert np.all(np.diff(scores) <= 0)  # ranked, best first
    assert result.directed is directed and set(result.genes) <= set(run.tokens.vocabulary[1:])


def test_case_only_and_case_minus_control_match_brute_force(run):
    labels = run.tokens.obs["label"].to_numpy()
    case, control = np.flatnonzero(labels == "AD"), np.flatnonzero(labels != "AD")
    weights = run.sample.weights
    only = AttentionExtractor(variant="case", case="AD", layers=[-1], batch_size=1).extract(run)
    expected = _brute_force(run, case, weights, directed=False, layers=[-1])
    got = _as_dict(only, directed=False)
    assert got.keys() == expected.keys()
    for pair, value in expected.items():
        assert got[pair] == pytest.approx(value, rel=1e-9)
    difference = _as_dict(
        AttentionExtractor(variant="case_minus_control", case="AD", batch_size=1).extract(run), False
    )
    in_case = _brute_force(run, case, weights, directed=False)
    in_control = _brute_force(run, control, weights, directed=False)
    shared = in_case.keys() & in_control.keys()
    assert difference.keys() == shared
    for pair in shared:
        assert difference[pair] == pytest.approx(in_case[pair] - in_control[pair], rel=1e-9, abs=1e-12)


def test_counts_equal_weighted_presence_product_and_universe_is_limited(run):
    extractor = AttentionExtractor(n_genes=5)
    cells = np.arange(run.tokens.n_cells)
    universe = extractor._universe(run.model, run, cells)
    assert len(universe) == 5
    z, m = extractor.aggregate(run.model, run, cells, run.sample.weights, universe)
    presence = np.zeros((run.tokens.n_cells, len(universe)))
    for cell in cells:
        ids, _ = run.tokens.cell(cell)
        presence[cell] = np.isin(universe, ids)
    expected = presence.T @ (run.sample.weights[:, None] * presence)
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(m, expected, rtol=1e-12)
    result = extractor.extract(run)
    assert set(result.genes) == {run.tokens.vocabulary[i] for i in universe}


def test_clear_errors():
    tokens = _tokens()
    context = RunContext(tokens=tokens, roles=DataRoles(label_key="label"))
    with pytest.raises(DataError, match="attention API"):
        AttentionExtractor().extract(context)
    with pytest.raises(DataError, match="case"):
        AttentionExtractor(variant="case")._groups(context)


class _FixedAttention:
    """An attention model whose maps are filled with one value (NaN: a model trained into NaN)."""

    token_info_ = {"special_ids": [0]}
    name = "fixed"

    def __init__(self, value):
        self.value = value

    def attention(
        self,
        tokens,
        *,
        cells=None,
        layers=None,
        heads=None,
        batch_size=8,
        max_length=None,
        include_special=False,
    ):
        from grnx_core.data_types import CellAttention

        for cell in cells:
            ids, _ = tokens.cell(int(cell))
            yield CellAttention(
                int(cell), np.asarray(ids), np.full((len(ids), len(ids)), self.value, np.float32)
            )


def test_non_finite_attention_is_refused():
    context = RunContext(tokens=_tokens(), model=_FixedAttention(float("nan")))
    with pytest.raises(
        DataError, match=r"attention over cell 'c0' \(row 0\) holds NaN or inf.*learning_rate"
    ):
        AttentionExtractor().extract(context)


def test_no_scored_pair_is_refused():
    one_gene_each = TokenizedCells(
        np.array([1, 2, 3]),
        np.array([0, 1, 2, 3]),
        pd.DataFrame(index=["a", "b", "c"]),
        values=np.ones(3),
        vocabulary=["<pad>", "G1", "G2", "G3"],
        metadata={"pad_id": 0},
    )
    context = RunContext(tokens=one_gene_each, model=_FixedAttention(0.5))
    with pytest.raises(DataError, match="no two genes of the universe appear together in the 3 cells"):
        AttentionExtractor().extract(context)


def test_case_and_control_attending_alike_is_refused():
    context = RunContext(tokens=_tokens(), roles=DataRoles(label_key="label"), model=_FixedAttention(0.25))
    extractor = AttentionExtractor(variant="case_minus_control", case="AD")
    with pytest.raises(
        DataError,
        match=r"every pair scores 0 over the 16 cells of both groups \(case and control attend alike\)",
    ):
        extractor.extract(context)
