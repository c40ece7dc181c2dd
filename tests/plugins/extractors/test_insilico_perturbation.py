"""insilico_perturbation: perturbed tokens built by hand, shifts equal to cell-by-cell forward passes
through Hugging Face BERT, statistics equal to scipy / statsmodels called directly, a planted marker
gene found by a fine-tuned model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from scipy import stats

from grnx_core import DataError, DataRoles, RunContext, TokenizedCells
from grnx_core.recipe import TrainSettings
from grnx_core.testing import Case, check_extractor
from grnx_plugins.extractors import _perturbation_stats as perturbation_stats
from grnx_plugins.extractors._perturbed_tokens import PerturbationBuilder, chosen_genes, each_present_gene
from grnx_plugins.extractors.insilico_perturbation import InsilicoPerturbationExtractor

VOCABULARY = ["<pad>", "<mask>", "<cls>", "<eos>"] + [f"G{i}" for i in range(24)]
SPECIAL = [0, 1, 2, 3]
MARKER = VOCABULARY.index("G7")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _marker_tokens(
    n_cells: int, n_genes: int, seed: int, values: bool = False, special: bool = False
) -> TokenizedCells:
    """Cells of types A and B with random genes in random order; A cells also hold the marker G7
    among their first three genes, B cells never. ``special``: <cls> first, <eos> last (V2)."""
    rng = np.random.default_rng(seed)
    others = [i for i in range(4, len(VOCABULARY)) if i != MARKER]
    ids: list[int] = []
    weights: list[float] = []
    offsets, types = [0], []
    for cell in range(n_cells):
        kind = "A" if cell % 2 == 0 else "B"
        genes = [int(g) for g in rng.choice(others, n_genes, replace=False)]
        if kind == "A":
            genes.insert(int(rng.integers(0, 3)), MARKER)
        else:
            genes.append(int(rng.choice([g for g in others if g not in genes])))
        cell_ids = [2, *genes, 3] if special else genes
        ids += cell_ids
        weights += [0.0] * special + list(np.sort(rng.uniform(0.5, 2.0, len(genes)))[::-1]) + [0.0] * special
        offsets.append(len(ids))
        types.append(kind)
    return TokenizedCells(
        np.array(ids),
        np.array(offsets),
        pd.DataFrame({"cell_type": types}, index=[f"c{i}" for i in range(n_cells)]),
        values=np.array(weights) if values else None,
        vocabulary=VOCABULARY,
        metadata={
            "pad_id": 0,
            "vocab_size": len(VOCABULARY),
            "special_ids": SPECIAL,
            "model_input_size": n_genes + 1 + 2 * special,
        },
    )


def _context(tokens: TokenizedCells, model=None, epochs: int = 15) -> RunContext:
    return RunContext(
        seed=0,
        roles=DataRoles(label_key="cell_type", cell_type_key="cell_type"),
        tokens=tokens,
        model=model,
        train_settings=TrainSettings(
            epochs=epochs, batch_size=8, learning_rate=0.003, validation_fraction=0.0, device="cpu"
        ),
    )


@pytest.fixture(scope="module")
def geneformer_run():
    """A 2-layer Geneformer (V1 tokens: no <cls>) fine-tuned A vs B on 200 cells, where the planted
    marker G7 decides the type. After training, the other genes' input embeddings are set to their
    mean: the model cannot tell them apart, so they are truly random genes (a trained model also
    learns chance correlations of genes with the type in a finite sample, and a mean-pooled
    embedding moves by a gene-specific amount when any gene is removed; both are real, consistent
    effects that a rank-sum test rightly detects)."""
    from grnx_plugins.models.geneformer import Geneformer

    tokens = _marker_tokens(200, 12, seed=0)
    context = _context(tokens, epochs=5)
    model = Geneformer(
        n_layers=2, hidden_size=32, n_heads=2, intermediate_size=64, max_positions=32, dropout=0.0
    ).fit(context)
    others = [i for i in range(4, len(VOCABULARY)) if i != MARKER]
    with torch.no_grad():
        embeddings = model.network_.hf.bert.embeddings.word_embeddings.weight
        embeddings[others] = embeddings[others].mean(dim=0)
    context.model = model
    return context


@pytest.fixture(scope="module", params=[False, True], ids=["v1", "v2_special_tokens"])
def small_run(request):
    """A tiny, briefly trained Geneformer on 12 cells of 5 genes (V1 tokens, or V2's <cls> ... <eos>),
    for brute-force comparisons."""
    from grnx_plugins.models.geneformer import Geneformer

    tokens = _marker_tokens(12, 5, seed=3, special=request.param)
    context = _context(tokens, epochs=2)
    model = Geneformer(
        n_layers=2, hidden_size=16, n_heads=2, intermediate_size=32, max_positions=16, dropout=0.0
    ).fit(context)
    context.model = model
    return context


def _extract(context: RunContext, **params) -> tuple[object, pd.DataFrame]:
    """Interactions and the logged per-gene table."""

    class Recorder:
        tables: dict[str, pd.DataFrame] = {}

        def log_artifact(self, path, artifact_path=None):
            Recorder.tables[path.name] = pd.read_parquet(path)

        def log_figure(self, name, figure):
            assert figure.axes, name

        def log_metrics(self, metrics, step=None):
            Recorder.tables["metrics"] = pd.DataFrame([metrics])

    Recorder.tables = {}
    context.logger = Recorder()
    interactions = InsilicoPerturbationExtractor(**params).extract(context)
    (table,) = [t for name, t in Recorder.tables.items() if name.endswith(".parquet")]
    return interactions, table


# -- reference: one Hugging Face forward pass per cell -------------------------------------------


def _states(model, ids: list[int], layer: int) -> np.ndarray:
    """``hidden_states[layer]`` of one unpadded cell through Hugging Face BERT, float64."""
    with torch.no_grad():
        out = model.network_.hf.bert(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            output_hidden_states=True,
        )
    return out.hidden_states[layer][0].double().numpy()


def _cell_embedding(model, ids: list[int], layer: int) -> np.ndarray:
    states = _states(model, ids, layer)
    return states[[t not in SPECIAL for t in ids]].mean(axis=0)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _reference(context: RunContext, kind: str, goal: str | None, layer: int = -2):
    """Per-gene shifts of every start cell (A, or all cells without a goal), perturbing each gene
    alone as Geneformer's isp_perturb_all does, and the mean gene-gene ``1 - cos`` per pair."""
    model, tokens = context.model, context.tokens
    types = tokens.obs["cell_type"].to_numpy()
    goal_embedding = None
    if goal is not None:
        goal_cells = np.flatnonzero(types == goal)
        goal_embedding = np.mean(
            [_cell_embedding(model, tokens.cell(c)[0].tolist(), layer) for c in goal_cells], axis=0
        )
    start = np.flatnonzero(types == "A") if goal is not None else np.arange(tokens.n_cells)
    shifts: dict[str, list[float]] = {}
    pairs: dict[tuple[str, str], list[float]] = {}
    for cell in start:
        ids = tokens.cell(cell)[0].tolist()
        original_states = _states(model, ids, layer)
        original = original_states[[t not in SPECIAL for t in ids]].mean(axis=0)
        first = 1 if ids[0] == 2 else 0  # overexpressed genes go after <cls>
        for position, gene in enumerate(ids):
            if gene in SPECIAL:
                continue
            rest = [(p, t) for p, t in enumerate(ids) if p != position]
            if kind == "delete":
                new = rest
            else:
                if position == first:
                    continue  # already first
                new = rest[:first] + [(-1, gene)] + rest[first:]
            new_ids = [t for _, t in new]
            states = _states(model, new_ids, layer)
            embedding = states[[t not in SPECIAL for t in new_ids]].mean(axis=0)
            if goal_embedding is None:
                value = 1.0 - _cos(embedding, original)
            else:
                value = _cos(embedding, goal_embedding) - _cos(original, goal_embedding)
            shifts.setdefault(VOCABULARY[gene], []).append(value)
            for j, (old, token) in enumerate(new):
                if old >= 0 and token not in SPECIAL:
                    key = (VOCABULARY[gene], VOCABULARY[token])
                    pairs.setdefault(key, []).append(1.0 - _cos(states[j], original_states[old]))
    return shifts, {key: float(np.mean(v)) for key, v in pairs.items()}


# -- statistics against scipy and statsmodels ----------------------------------------------------


def test_rank_sums_equal_scipy_with_the_tested_group_left_out():
    rng = np.random.default_rng(0)
    owner = rng.integers(0, 6, 400)
    values = rng.normal(size=400) + 0.3 * (owner == 2)
    values[:40] = np.round(values[:40], 1)  # ties
    statistic, pvalue, n_null = perturbation_stats.rank_sum_tests(values, owner, 7, values, owner)
    for group in range(6):
        expected = stats.ranksums(values[owner == group], values[owner != group])
        assert statistic[group] == pytest.approx(expected.statistic, rel=1e-10, abs=1e-12)
        assert pvalue[group] == pytest.approx(expected.pvalue, rel=1e-10, abs=1e-300)
        assert n_null[group] == int(np.sum(owner != group))
    assert np.isnan(pvalue[6])  # a group with no value


def test_rank_sums_against_a_separate_null_equal_scipy():
    rng = np.random.default_rng(1)
    owner = rng.integers(0, 4, 120)
    values = rng.normal(size=120)
    pool = rng.normal(0.2, 1.0, 300)
    pool_owner = rng.integers(-1, 4, 300)  # -1: a null gene that is not tested
    _, pvalue, _ = perturbation_stats.rank_sum_tests(values, owner, 4, pool, pool_owner)
    for group in range(4):
        expected = stats.ranksums(values[owner == group], pool[pool_owner != group]).pvalue
        assert pvalue[group] == pytest.approx(expected, rel=1e-10)


def test_benjamini_hochberg_equals_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    pvalues = np.random.default_rng(2).uniform(0, 1, 50) ** 3
    pvalues[[3, 9]] = pvalues[5]  # ties
    expected = multitest.multipletests(pvalues, alpha=0.05, method="fdr_bh")[1]
    np.testing.assert_allclose(perturbation_stats.benjamini_hochberg(pvalues), expected, rtol=1e-12)
    with_nan = np.r_[pvalues, np.nan]
    adjusted = perturbation_stats.benjamini_hochberg(with_nan)
    assert np.isnan(adjusted[-1])
    np.testing.assert_allclose(adjusted[:-1], expected, rtol=1e-12)


def test_downsampling_is_seeded_and_without_replacement():
    first = perturbation_stats.downsample(1000, 100, seed=5)
    assert len(np.unique(first)) == 100 and np.array_equal(first, np.sort(first))
    np.testing.assert_array_equal(first, perturbation_stats.downsample(1000, 100, seed=5))
    assert not np.array_equal(first, perturbation_stats.downsample(1000, 100, seed=6))
    np.testing.assert_array_equal(perturbation_stats.downsample(50, 100, seed=5), np.arange(50))


# -- perturbed tokens ------------------------------------------------------------------------------


def _one_cell(ids: list[int], max_length: int | None = None) -> TokenizedCells:
    metadata = {"pad_id": 0, "special_ids": SPECIAL}
    if max_length is not None:
        metadata["model_input_size"] = max_length
    return TokenizedCells(
        np.array(ids),
        np.array([0, len(ids)]),
        pd.DataFrame(index=["c"]),
        vocabulary=VOCABULARY,
        metadata=metadata,
    )


def _copies(batch) -> list[tuple[list[int], list[int]]]:
    out = []
    for k in range(batch.n_copies):
        start, stop = batch.perturbed.offsets[k], batch.perturbed.offsets[k + 1]
        out.append((batch.perturbed.input_ids[start:stop].tolist(), batch.origin[start:stop].tolist()))
    return out


def test_overexpress_puts_the_gene_first_after_cls():
    cell = [2, 10, 11, 12, 13, 3]  # <cls> G6 G7 G8 G9 <eos>
    builder = PerturbationBuilder(_one_cell(cell))
    lookup = np.arange(len(VOCABULARY))
    each_present_gene(builder, np.array([0]), "overexpress", SPECIAL, lookup)
    copies = _copies(builder.build())
    # G6 is already first: no copy; every other gene moves right after <cls>, the rest keep their order
    assert [ids for ids, _ in copies] == [
        [2, 11, 10, 12, 13, 3],
        [2, 12, 10, 11, 13, 3],
        [2, 13, 10, 11, 12, 3],
    ]
    assert copies[1][1] == [0, -1, 1, 2, 4, 5]  # positions in the original; the moved gene is -1


def test_delete_removes_every_occurrence_and_maps_positions():
    cell = [10, 11, 10, 12]  # G6 twice (duplicated ids that were not summed)
    builder = PerturbationBuilder(_one_cell(cell))
    each_present_gene(builder, np.array([0]), "delete", SPECIAL, np.arange(len(VOCABULARY)))
    batch = builder.build()
    assert _copies(batch) == [([11, 12], [1, 3]), ([10, 10, 12], [0, 2, 3]), ([10, 11, 10], [0, 1, 2])]
    assert batch.originals.n_cells == 1 and batch.target.tolist() == [10, 11, 12]


def test_overexpressing_an_absent_gene_cuts_the_same_gene_from_both_sides():
    cell = [2, 10, 11, 12, 3]  # full at 5 tokens
    builder = PerturbationBuilder(_one_cell(cell, max_length=5))
    chosen_genes(builder, [(0, np.array([20]), 0), (0, np.array([12]), 1)], "overexpress", SPECIAL, 5)
    batch = builder.build()
    (inserted, inserted_origin), (moved, moved_origin) = _copies(batch)
    assert inserted == [2, 20, 10, 11, 3]  # G8 (the last gene) made room
    assert moved == [2, 12, 10, 11, 3]  # present: nothing to cut
    original_ids = [batch.originals.cell(r)[0].tolist() for r in batch.compare_with]
    assert original_ids == [[2, 10, 11, 3], [2, 10, 11, 12, 3]]
    assert inserted_origin == [0, -1, 1, 2, 3] and moved_origin == [0, -1, 1, 2, 4]


def test_group_deletion_skips_cells_without_the_genes_and_cells_left_empty():
    tokens = TokenizedCells(
        np.array([10, 11, 12, 13, 10, 11]),
        np.array([0, 3, 4, 6]),
        pd.DataFrame(index=["a", "b", "c"]),
        vocabulary=VOCABULARY,
        metadata={"special_ids": SPECIAL},
    )
    builder = PerturbationBuilder(tokens)
    group = np.array([10, 11])
    chosen_genes(builder, [(c, group, 0) for c in range(3)], "delete", SPECIAL, None)
    batch = builder.build()
    assert _copies(batch) == [([12], [2])]  # b lacks them, c would be left without a gene
    assert batch.originals.n_cells == 1 and batch.original_cell.tolist() == [0]


# -- the extractor against the reference ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["delete", "overexpress"])
def test_goal_shifts_statistics_and_gene_pairs_equal_the_reference(small_run, kind):
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    interactions, table = _extract(
        small_run, perturb_type=kind, state_key="cell_type", start_state="A", goal_state="B", batch_size=3
    )
    shifts, pairs = _reference(small_run, kind, goal="B")
    table = table.set_index("Gene")
    for gene, values in shifts.items():
        assert table.loc[gene, "Shift_to_goal_end"] == pytest.approx(np.mean(values), abs=2e-6)
        assert table.loc[gene, "N_Detections"] == len(values)
    # the null of each gene: every other gene's shifts (Geneformer's pool would include its own)
    genes = sorted(shifts)
    pvalues = np.array(
        [
            stats.ranksums(shifts[g], np.concatenate([shifts[o] for o in genes if o != g])).pvalue
            for g in genes
        ]
    )
    np.testing.assert_allclose(table.loc[genes, "Goal_end_vs_random_pval"], pvalues, rtol=1e-3, atol=1e-8)
    fdr = multitest.multipletests(pvalues, method="fdr_bh")[1]
    np.testing.assert_allclose(table.loc[genes, "Goal_end_FDR"], fdr, rtol=1e-3, atol=1e-8)
    assert (table.loc[genes, "Sig"] == (table.loc[genes, "Goal_end_FDR"] < 0.05)).all()
    found = {
        (s, t): v for s, t, v in interactions.table[["source", "target", "score"]].itertuples(index=False)
    }
    assert set(found) == set(pairs)
    for key, value in pairs.items():
        assert found[key] == pytest.approx(value, abs=2e-6)
    assert interactions.directed and interactions.extractor == "insilico_perturbation"


def test_without_states_the_shift_is_one_minus_the_cell_cosine(small_run):
    _, table = _extract(small_run, statistics="none", batch_size=4)
    shifts, _ = _reference(small_run, "delete", goal=None)
    table = table.set_index("Gene")
    for gene, values in shifts.items():
        assert table.loc[gene, "Shift"] == pytest.approx(np.mean(values), abs=2e-6)
        assert table.loc[gene, "Cosine_sim_mean"] == pytest.approx(1 - np.mean(values), abs=2e-6)
    assert "Sig" not in table.columns
    assert list(table["Shift"]) == sorted(table["Shift"], reverse=True)


def test_the_null_excludes_the_tested_gene(small_run):
    """Geneformer's goal-state mode pools the tested gene into its own null; grnx must not."""
    _, table = _extract(small_run, state_key="cell_type", start_state="A", goal_state="B")
    shifts, _ = _reference(small_run, "delete", goal="B")
    marker = shifts["G7"]
    pooled = np.concatenate(list(shifts.values()))
    others = np.concatenate([v for g, v in shifts.items() if g != "G7"])
    geneformer = stats.ranksums(pooled, marker).pvalue
    grnx = stats.ranksums(marker, others).pvalue
    assert grnx < geneformer
    found = table.set_index("Gene").loc["G7", "Goal_end_vs_random_pval"]
    assert found == pytest.approx(grnx, rel=1e-3)
    assert table.set_index("Gene").loc["G7", "N_Null"] == len(others)


def test_downsampled_null_is_seeded(small_run):
    to_goal = {"state_key": "cell_type", "start_state": "A", "goal_state": "B", "null_size": 20}
    first = _extract(small_run, **to_goal, seed=3)[1]
    again = _extract(small_run, **to_goal, seed=3)[1]
    other = _extract(small_run, **to_goal, seed=4)[1]
    pd.testing.assert_frame_equal(first, again)
    assert (first["N_Null"] <= 20).all()
    assert not first["Goal_end_vs_random_pval"].equals(other["Goal_end_vs_random_pval"])


# -- the planted marker ---------------------------------------------------------------------------


def test_deleting_the_planted_marker_moves_cells_to_the_goal_and_is_significant(geneformer_run):
    tokens = geneformer_run.tokens
    assert (geneformer_run.model.predict(tokens) == tokens.obs["cell_type"]).mean() == 1.0
    for statistics in ("vs_others", "vs_null"):
        _, table = _extract(
            geneformer_run,
            state_key="cell_type",
            start_state="A",
            goal_state="B",
            statistics=statistics,
            max_cells=30,
        )
        assert table.loc[0, "Gene"] == "G7" and table.loc[0, "Sig"] == 1
        assert table.loc[0, "N_Detections"] == 30 and table.loc[0, "Goal_end_FDR"] < 1e-6
        random_genes = table.iloc[1:]
        assert random_genes["Shift_to_goal_end"].abs().max() < 0.1 * table.loc[0, "Shift_to_goal_end"]
        assert random_genes["Sig"].sum() == 0
        assert random_genes["Goal_end_FDR"].min() > 0.05


def test_overexpressing_the_marker_in_goal_cells_moves_them_to_the_marker_state(geneformer_run):
    _, table = _extract(
        geneformer_run,
        perturb_type="overexpress",
        genes=["G7", "G1", "G2"],
        state_key="cell_type",
        start_state="B",
        goal_state="A",
        max_cells=30,
    )
    rows = table.set_index("Gene")
    assert rows.loc["G7", "Shift_to_goal_end"] > 0.5
    assert rows.loc["G7", "Shift_to_goal_end"] > 4 * rows.drop(index="G7")["Shift_to_goal_end"].abs().max()
    assert rows.loc["G7", "N_Detections"] == 30  # absent from every B cell: inserted in each


def test_celluformer_deletion_finds_the_marker(tmp_path):
    from grnx_plugins.models.celluformer import CelluFormer

    tokens = _marker_tokens(40, 10, seed=1, values=True)
    context = _context(tokens, epochs=10)
    context.model = CelluFormer(d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0).fit(context)
    _, table = _extract(context, state_key="cell_type", start_state="A", goal_state="B", alt_states=[])
    assert table.loc[0, "Gene"] == "G7" and table.loc[0, "Sig"] == 1
    with pytest.raises(DataError, match="overexpress moves a gene to the front"):
        InsilicoPerturbationExtractor(perturb_type="overexpress").extract(context)


def test_alternative_states_and_group_perturbation_with_a_random_gene_null(geneformer_run):
    context = geneformer_run
    tokens = context.tokens
    # a third state: half of the B cells relabelled C
    obs = tokens.obs.copy()
    b_cells = np.flatnonzero(obs["cell_type"].to_numpy() == "B")
    obs.iloc[b_cells[::2], 0] = "C"
    relabelled = TokenizedCells(
        tokens.input_ids, tokens.offsets, obs, None, tokens.vocabulary, tokens.metadata
    )
    run = RunContext(seed=0, roles=context.roles, tokens=relabelled, model=context.model)
    interactions, table = _extract(
        run,
        genes=["G7", "G1"],
        group=True,
        statistics="vs_null",
        state_key="cell_type",
        start_state="A",
        goal_state="B",
        alt_states=["C"],
        null_genes_per_cell=5,
        max_cells=40,
    )
    assert table.loc[0, "Gene"] == "G7+G1"
    assert {"Shift_to_alt_end_C", "Alt_end_vs_random_pval_C", "Alt_end_FDR_C"} <= set(table.columns)
    assert table.loc[0, "Shift_to_goal_end"] > 0.5 and table.loc[0, "Sig"] == 1
    assert set(interactions.table["source"]) == {"G7+G1"}


# -- parameters, errors, contract -------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, message",
    [
        ({"group": True}, "give genes as a list"),
        ({"genes": ["G1", "G2"], "group": True}, "use statistics: vs_null"),
        ({"genes": ["G1"]}, "at least 2 perturbed genes"),
        ({"goal_state": "B"}, "goal_state needs start_state"),
        ({"start_state": "A", "goal_state": "A"}, "must all differ"),
        ({"genes": ["G1", "G1"]}, "more than once"),
    ],
)
def test_inconsistent_parameters_are_refused(params, message):
    with pytest.raises(ValidationError, match=message):
        InsilicoPerturbationExtractor.Params(**params)


def test_unknown_states_and_genes_are_clear_errors(small_run):
    unknown_goal = InsilicoPerturbationExtractor(state_key="cell_type", start_state="A", goal_state="Z")
    with pytest.raises(DataError, match="no cell of the step has cell_type == 'Z'"):
        unknown_goal.extract(small_run)
    with pytest.raises(DataError, match="not in the tokens' vocabulary"):
        InsilicoPerturbationExtractor(genes=["G1", "NOPE"]).extract(small_run)
    with pytest.raises(DataError, match="not carried with the tokens"):
        InsilicoPerturbationExtractor(state_key="donor", start_state="A").extract(small_run)


def test_contract_on_the_suite_fixture():
    tiny = ("celluformer", {"d_model": 8, "n_layers": 1, "n_heads": 2, "d_ff": 16, "dropout": 0.0})
    ran = check_extractor(
        InsilicoPerturbationExtractor,
        case=Case({"max_cells": 6}, tokenizer=("expression_scaled", {"max_length": 16}), model=tiny),
    )
    assert ran == ["returns_type", "same_seed", "sparse_dense", "save_load"]


def test_bfloat16_forward_passes_give_nearly_the_float32_shifts(small_run):
    to_goal = {"state_key": "cell_type", "start_state": "A", "goal_state": "B", "statistics": "none"}
    exact = _extract(small_run, **to_goal)[1].set_index("Gene")["Shift_to_goal_end"]
    fast = _extract(small_run, **to_goal, precision="bfloat16")[1].set_index("Gene")["Shift_to_goal_end"]
    difference = (exact - fast.loc[exact.index]).abs()
    assert 0 < difference.max() < 0.02 * exact.abs().max() + 1e-4
