"""Attention extractor: its Z/M aggregation, the APC / centring corrections and the top-expressed
cut equal brute-force loops over cells, gene pairs and hand-built cells."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from grnx_core import CellSample, DataError, DataRoles, RunContext, TokenizedCells
from grnx_plugins.extractors.attention import AttentionExtractor, keep_most_expressed


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
    ranked = AttentionExtractor(variant="case_minus_control", case="AD", batch_size=1).extract(run)
    # a difference ranks by magnitude by default and keeps the sign
    assert ranked.metadata["rank_by"] == "abs" and (ranked.table["score"] >= 0).all()
    table = ranked.table
    difference = {
        frozenset((s, t)): score * sign
        for s, t, score, sign in table[["source", "target", "score", "sign"]].itertuples(index=False)
    }
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


# -- corrections for each gene's average attention ---------------------------------------------


def _loop_corrected(scores, how, directed):
    """APC (Dunn et al. 2008) or double centring of a dict of pair scores, by plain loops."""
    full = {}
    for pair, value in scores.items():
        if directed:
            full[pair] = value
        else:
            a, b = tuple(pair)
            full[a, b] = full[b, a] = value
    genes = {gene for pair in full for gene in pair}
    row = {g: np.mean([v for (a, _), v in full.items() if a == g]) for g in genes}
    column = {g: np.mean([v for (_, b), v in full.items() if b == g]) for g in genes}
    overall = np.mean(list(full.values()))
    corrected = {}
    for (a, b), value in full.items():
        if how == "apc":
            corrected[a, b] = value - row[a] * column[b] / overall
        else:
            corrected[a, b] = value - row[a] - column[b] + overall
    return corrected


@pytest.mark.parametrize("how", ["apc", "center"])
@pytest.mark.parametrize("directed", [False, True])
def test_normalize_matches_loop_over_pairs(run, how, directed):
    result = AttentionExtractor(normalize=how, directed=directed, batch_size=1).extract(run)
    raw = _brute_force(run, range(run.tokens.n_cells), run.sample.weights, directed)
    expected = _loop_corrected(raw, how, directed)
    got = _as_dict(result, directed)
    assert len(got) == len(raw)
    for pair, value in got.items():
        key = pair if directed else tuple(pair)
        assert value == pytest.approx(expected[key], rel=1e-9, abs=1e-12)
    assert result.metadata["normalize"] == how and result.metadata["rank_by"] == "value"


def test_normalize_each_group_before_the_difference(run):
    labels = run.tokens.obs["label"].to_numpy()
    case, control = np.flatnonzero(labels == "AD"), np.flatnonzero(labels != "AD")
    result = AttentionExtractor(
        variant="case_minus_control", case="AD", normalize="apc", rank_by="value", batch_size=1
    ).extract(run)
    in_case = _loop_corrected(_brute_force(run, case, run.sample.weights, False), "apc", False)
    in_control = _loop_corrected(_brute_force(run, control, run.sample.weights, False), "apc", False)
    got = _as_dict(result, False)
    assert got.keys() == {frozenset(p) for p in in_case.keys() & in_control.keys()}
    for pair, value in got.items():
        a, b = tuple(pair)
        assert value == pytest.approx(in_case[a, b] - in_control[a, b], rel=1e-9, abs=1e-12)


def test_apc_refuses_scores_without_positive_mean():
    context = RunContext(tokens=_tokens(), model=_FixedAttention(0.0))
    with pytest.raises(DataError, match="normalize 'apc' divides by the mean score"):
        AttentionExtractor(normalize="apc").extract(context)


# -- layers, heads, universe ---------------------------------------------------------------


def test_negative_layer_and_head_indices_count_from_the_end(run):
    from_end = _as_dict(AttentionExtractor(layers=[-1], heads=[-2]).extract(run), False)
    explicit = _as_dict(AttentionExtractor(layers=[1], heads=[0]).extract(run), False)
    assert from_end == explicit
    other_head = _as_dict(AttentionExtractor(layers=[1], heads=[1]).extract(run), False)
    assert other_head != explicit  # the selection is applied


@pytest.mark.parametrize(
    "selection, message",
    [({"layers": [2]}, r"params.layers=\[2\].*layers must be in \[-2, 2\)"), ({"heads": [-3]}, "heads")],
)
def test_out_of_range_layers_and_heads_are_refused(run, selection, message):
    with pytest.raises(DataError, match=message):
        AttentionExtractor(**selection).extract(run)


def test_explicit_gene_universe(run):
    result = AttentionExtractor(genes=["G3", "G1", "G5"], batch_size=1).extract(run)
    assert result.genes == ["G1", "G3", "G5"]
    full = _brute_force(run, range(run.tokens.n_cells), run.sample.weights, False)
    # the universe only restricts the pairs: Z/M of a pair does not depend on the other genes
    for pair, value in _as_dict(result, False).items():
        assert value == pytest.approx(full[pair], rel=1e-9)
    with pytest.raises(DataError, match="special tokens"):
        AttentionExtractor(genes=["G1", "<pad>"]).extract(run)
    with pytest.raises(DataError, match="not in the data"):
        AttentionExtractor(genes=["G1", "G99"]).extract(run)


# -- max_length keeps the most expressed genes -----------------------------------------------


class _RecordingAttention(_FixedAttention):
    """Uniform maps; remembers the tokens (ids and values) each cell was given."""

    def __init__(self, special_ids):
        super().__init__(0.5)
        self.token_info_ = {"special_ids": special_ids}
        self.seen = {}

    def attention(self, tokens, *, cells=None, **options):
        for cell in cells:
            self.seen[int(cell)] = tokens.cell(int(cell))
        yield from super().attention(tokens, cells=cells, **options)


def _hand_built(values):
    """Cell 0: G1..G6 written in gene order with these values; cell 1: G1, G2."""
    return TokenizedCells(
        np.array([1, 2, 3, 4, 5, 6, 1, 2]),
        np.array([0, 6, 8]),
        pd.DataFrame(index=["long", "short"]),
        values=np.r_[values, 1.0, 1.0],
        vocabulary=["<pad>"] + [f"G{i}" for i in range(1, 7)],
        metadata={"pad_id": 0},
    )


def test_max_length_keeps_the_highest_values_in_token_order():
    tokens = _hand_built([0.5, 3.0, 1.0, 5.0, 2.0, 3.0])
    model = _RecordingAttention([0])
    result = AttentionExtractor(max_length=3, weighting="uniform").extract(
        RunContext(tokens=tokens, model=model)
    )
    ids, values = model.seen[0]
    # G4 (5.0) then the tie G2 / G6 (3.0): the earlier token wins; order of the cell kept
    assert ids.tolist() == [2, 4, 6] and values.tolist() == [3.0, 5.0, 3.0]
    assert model.seen[1][0].tolist() == [1, 2]  # short cells untouched
    assert set(result.genes) == {"G1", "G2", "G4", "G6"}  # G3, G5 were cut from the only cell


def test_max_length_keeps_special_tokens_and_first_rank_value_genes():
    # rank-value cells are written most expressed first: <cls> G5 G2 G6 G1 <eos>
    vocabulary = ["<pad>", "<cls>", "<eos>"] + [f"G{i}" for i in range(1, 7)]
    tokens = TokenizedCells(
        np.array([1, 7, 4, 8, 3, 2]),
        np.array([0, 6]),
        pd.DataFrame(index=["cell"]),
        vocabulary=vocabulary,
        metadata={"pad_id": 0},
    )
    kept = keep_most_expressed(tokens, 4, [0, 1, 2])
    assert kept.cell(0)[0].tolist() == [1, 7, 4, 2]
    with pytest.raises(DataError, match="max_length=2 leaves no gene"):
        keep_most_expressed(tokens, 2, [0, 1, 2])


def test_max_length_on_a_trained_model_equals_cells_cut_by_hand(run):
    tokens = run.tokens
    cut_ids, cut_values, offsets = [], [], [0]
    for cell in range(tokens.n_cells):
        ids, values = tokens.cell(cell)
        top = np.sort(np.argsort(-values, kind="stable")[:3])
        cut_ids += ids[top].tolist()
        cut_values += values[top].tolist()
        offsets.append(len(cut_ids))
    cut = TokenizedCells(
        np.array(cut_ids),
        np.array(offsets),
        tokens.obs,
        values=np.array(cut_values),
        vocabulary=tokens.vocabulary,
        metadata=tokens.metadata,
    )
    by_hand = RunContext(tokens=cut, model=run.model, sample=run.sample)
    expected = _brute_force(by_hand, range(cut.n_cells), run.sample.weights, directed=False)
    got = _as_dict(AttentionExtractor(max_length=3, batch_size=3).extract(run), False)
    assert got.keys() == expected.keys()
    for pair, value in expected.items():
        assert got[pair] == pytest.approx(value, rel=1e-6)


def test_execution_num_threads_sets_torch_threads_during_extraction(monkeypatch):
    import torch

    from grnx_core.recipe import ExecutionSettings

    seen = []
    model = _RecordingAttention([0])
    real_attention = model.attention

    def attention(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_attention(*args, **kwargs)

    monkeypatch.setattr(model, "attention", attention)
    before = torch.get_num_threads()
    context = RunContext(
        tokens=_hand_built([0.5, 3.0, 1.0, 5.0, 2.0, 3.0]),
        model=model,
        execution=ExecutionSettings(num_threads=3),
    )
    AttentionExtractor(weighting="uniform").extract(context)
    assert seen == [3] and torch.get_num_threads() == before
