"""NES of ranked pair lists: gseapy.prerank 1.3.1 is the reference implementation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from grnx_core import DataError, EvaluationResult, GroundTruth, Interactions, RunContext
from grnx_plugins.evaluators import _gsea
from grnx_plugins.evaluators.nes import NesEvaluator
from grnx_plugins.evaluators.nes_stability import NesStabilityEvaluator

gseapy = pytest.importorskip("gseapy")


def gseapy_prerank(items, metric, members, *, permutations, seed, weight=1.0):
    """gseapy's ES, NES, nominal p on an already sorted list (ascending=None: keep the order)."""
    ranking = pd.Series(np.asarray(metric, dtype=float), index=list(items))
    result = gseapy.prerank(
        ranking,
        {"truth": list(members)},
        min_size=1,
        max_size=10**9,
        permutation_num=permutations,
        seed=seed,
        weight=weight,
        ascending=None,
        threads=1,
        no_plot=True,
        outdir=None,
    ).res2d
    row = result.iloc[0]
    return float(row["ES"]), float(row["NES"]), float(row["NOM p-val"])


@pytest.mark.parametrize(
    ("n_items", "k", "weight", "seed", "planted"),
    [(300, 12, 1.0, 6, 0.0), (4000, 60, 1.0, 123, 0.3), (2500, 25, 0.5, 7, 0.0), (1000, 400, 2.0, 1, 0.1)],
)
def test_random_lists_match_gseapy_exactly_in_gseapy_stream(n_items, k, weight, seed, planted):
    rng = np.random.default_rng(seed)
    metric = np.sort(rng.normal(size=n_items))[::-1].copy()
    # some hits pushed to the top so ES is positive and NES non-trivial
    n_top = int(planted * k)
    hits = np.sort(np.r_[rng.choice(np.arange(50, n_items), k - n_top, replace=False), np.arange(n_top)])
    items = np.array([f"P{i}|Q{i}" for i in range(n_items)])
    es_ref, nes_ref, p_ref = gseapy_prerank(
        items, metric, items[hits], permutations=200, seed=seed, weight=weight
    )

    result = _gsea.prerank(metric, hits, weight=weight, n_permutations=200, seed=seed, stream="gseapy")
    assert result.es == es_ref  # bit-identical
    assert result.nes == nes_ref
    assert result.pvalue == p_ref

    fast = _gsea.prerank(metric, hits, weight=weight, n_permutations=200, seed=seed, stream="fast")
    assert fast.es == es_ref
    assert len(fast.null_es) == 200 and np.all(np.abs(fast.null_es) <= 1)


def test_fast_stream_nes_within_monte_carlo_error_of_gseapy():
    rng = np.random.default_rng(3)
    n_items, k = 3000, 40
    metric = np.arange(n_items - 1, -1, -1, dtype=float)
    hits = np.sort(np.r_[np.arange(0, 200, 20), rng.choice(np.arange(200, n_items), k - 10, replace=False)])
    exact = _gsea.prerank(metric, hits, n_permutations=1000, seed=6, stream="gseapy")
    fast = _gsea.prerank(metric, hits, n_permutations=1000, seed=11, stream="fast")
    # Both nulls are 1000 draws of the same distribution: their means and spreads agree to a few %.
    assert fast.nes == pytest.approx(exact.nes, rel=0.05)
    assert fast.null_es.std() == pytest.approx(exact.null_es.std(), rel=0.1)
    from scipy.stats import ks_2samp

    assert ks_2samp(fast.null_es, exact.null_es).pvalue > 0.001


def test_every_true_pair_at_the_top_gives_the_maximum_es():
    n_items, k = 500, 30
    metric = np.arange(n_items - 1, -1, -1, dtype=float)
    top = _gsea.prerank(metric, np.arange(k), n_permutations=100, seed=0)
    assert top.es == pytest.approx(1.0, abs=1e-12)
    assert top.pvalue == 0.0
    # any other placement scores lower
    rng = np.random.default_rng(0)
    for _ in range(20):
        other = np.sort(rng.choice(n_items, k, replace=False))
        if not np.array_equal(other, np.arange(k)):
            assert _gsea.enrichment_score(metric, other) < top.es


def test_fast_stream_subsets_are_uniform_sorted_and_distinct():
    for n, k in [(10, 3), (10, 8), (130, 64)]:  # 8 of 10 and 64 of 130 take the complement branch
        subsets = _gsea.random_sorted_subsets(n, k, 4000, seed=1)
        assert np.all(np.diff(subsets, axis=1) > 0) and subsets.min() >= 0 and subsets.max() < n
        counts = np.bincount(subsets.ravel(), minlength=n)
        expected = 4000 * k / n
        assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))
    # pairs of positions are equally likely too (uniform over subsets, not just over positions)
    pairs = _gsea.random_sorted_subsets(6, 2, 6000, seed=2)
    codes = np.bincount(pairs[:, 0] * 6 + pairs[:, 1], minlength=36)
    observed = codes[codes > 0]
    assert len(observed) == 15 and np.all(np.abs(observed - 400) < 5 * 20)


def _context_with(table: pd.DataFrame, edges: pd.DataFrame, *, directed_gt=False, extractor="pearson"):
    genes = sorted(set(table["source"]).union(table["target"]).union(edges["source"]).union(edges["target"]))
    context = RunContext(seed=0)
    context.interactions[extractor] = Interactions(table, directed=False, extractor=extractor, genes=genes)
    context.ground_truth = GroundTruth(edges, directed=directed_gt, name="planted")
    return context


def _random_problem(seed=0, n_genes=40, n_edges=60):
    rng = np.random.default_rng(seed)
    genes = [f"G{i:02d}" for i in range(n_genes)]
    rows, cols = np.triu_indices(n_genes, 1)
    table = pd.DataFrame(
        {
            "source": np.array(genes)[rows],
            "target": np.array(genes)[cols],
            "score": rng.normal(size=len(rows)),
        }
    )
    pick = rng.choice(len(rows), n_edges, replace=False)
    # the ground truth lists some edges in reverse order: they must still match undirected pairs
    source = np.where(pick % 2 == 0, table["source"].to_numpy()[pick], table["target"].to_numpy()[pick])
    target = np.where(pick % 2 == 0, table["target"].to_numpy()[pick], table["source"].to_numpy()[pick])
    return table, pd.DataFrame({"source": source, "target": target})


@pytest.mark.parametrize("rank_metric", ["rank", "score"])
def test_evaluator_matches_gseapy_on_pair_ids(rank_metric):
    table, edges = _random_problem()
    context = _context_with(table, edges)
    evaluator = NesEvaluator(
        ground_truth={"source": "data"},
        rank_metric=rank_metric,
        permutations=300,
        permutation_stream="gseapy",
        plot=True,
    )
    result = evaluator.evaluate(context)
    interactions = context.interactions["pearson"]
    items = interactions.pair_ids()
    metric = np.arange(len(items) - 1, -1, -1) if rank_metric == "rank" else interactions.table["score"]
    es, nes, p = gseapy_prerank(items, metric, context.ground_truth.pair_set(), permutations=300, seed=6)
    assert result.metrics["pearson/es"] == es
    assert result.metrics["pearson/nes"] == nes
    assert result.metrics["pearson/pvalue"] == p
    assert result.metrics["pearson/n_hits"] == 60
    assert set(result.figures) == {"pearson_enrichment"}
    assert all(NesEvaluator.declares(k) for k in result.metrics)
    overlap = result.tables["ground_truth_overlap"]
    assert overlap.loc[0, "gt_pairs_in_universe"] == 60


def test_real_krumsiek11_pearson_against_its_true_network_matches_gseapy():
    from grnx_plugins.data.scanpy_builtin import ScanpyBuiltin
    from grnx_plugins.extractors.pearson import PearsonExtractor

    source = ScanpyBuiltin(dataset="krumsiek11")
    context = RunContext(seed=0, adata=source.load())
    context.ground_truth = GroundTruth(source.ground_truth(), directed=True, name="krumsiek11")
    context.interactions["pearson"] = PearsonExtractor().extract(context)
    result = NesEvaluator(permutation_stream="gseapy", plot=False).evaluate(context)

    interactions = context.interactions["pearson"]
    items = interactions.pair_ids()
    truth = GroundTruth(context.ground_truth.edges[["source", "target"]], directed=False, name="u").pair_set()
    es, nes, p = gseapy_prerank(items, np.arange(len(items) - 1, -1, -1), truth, permutations=1000, seed=6)
    assert result.metrics["pearson/es"] == es
    assert result.metrics["pearson/nes"] == nes
    assert result.metrics["pearson/pvalue"] == p
    # 30 listed edges minus 4 self-loops = 26 directed; 20 distinct undirected pairs among 11 genes
    assert result.metrics["pearson/gt_edges"] == 26
    assert result.metrics["pearson/n_hits"] == 20


def test_top_n_and_extractor_selection():
    table, edges = _random_problem(seed=2)
    context = _context_with(table, edges)
    context.interactions["other"] = Interactions(
        table.assign(score=-table["score"]), directed=False, extractor="other"
    )
    result = NesEvaluator(extractors=["other"], top_n=300, permutations=50, plot=False).evaluate(context)
    assert set(k.split("/")[0] for k in result.metrics) == {"other"}
    assert result.metrics["other/n_items"] == 300
    with pytest.raises(DataError, match="does not have"):
        NesEvaluator(extractors=["missing"]).evaluate(context)


def test_no_overlap_is_a_clear_error():
    table, _ = _random_problem()
    edges = pd.DataFrame({"source": ["X1", "X2"], "target": ["X3", "X4"]})
    context = _context_with(table, edges)
    context.interactions["pearson"] = Interactions(table, directed=False, extractor="pearson")
    with pytest.raises(DataError, match="no pair of ground truth 'planted'"):
        NesEvaluator(permutations=10).evaluate(context)


def test_missing_ground_truth_is_a_clear_error():
    table, edges = _random_problem()
    context = _context_with(table, edges)
    context.ground_truth = None
    with pytest.raises(DataError, match="ships no ground truth"):
        NesEvaluator().evaluate(context)


def test_nes_stability_aggregate_contract():
    evaluator = NesStabilityEvaluator()
    assert NesStabilityEvaluator.needs_reference is True
    repeats = [
        EvaluationResult({"pearson/nes": 1.0, "pearson/es": 0.2}),
        EvaluationResult({"pearson/nes": 2.0, "pearson/es": 0.4}),
        EvaluationResult({"pearson/nes": 4.0, "pearson/es": 0.3}),
    ]
    reference = EvaluationResult({"pearson/nes": 2.0, "pearson/es": 0.3})
    out = evaluator.aggregate(repeats, reference)
    assert out["pearson/nes_mean"] == pytest.approx(7 / 3)
    assert out["pearson/nes_mse"] == pytest.approx((1 + 0 + 4) / 3)
    assert out["pearson/es_mse"] == pytest.approx((0.01 + 0.01 + 0) / 3)
    assert out["pearson/nes_reference"] == 2.0
    assert out["pearson/nes_std"] == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert out["pearson/n_repeats"] == 3
    assert all(NesStabilityEvaluator.declares(k) for k in out)
    # without a reference run: no MSE, still the means
    assert "pearson/nes_mse" not in evaluator.aggregate(repeats, None)


def test_nes_stability_end_to_end_on_repeats():
    """Repeats evaluate like nes; aggregate turns their metrics into mean NES and MSE."""
    table, edges = _random_problem(seed=5)
    evaluator = NesStabilityEvaluator(permutations=200, plot=False)
    reference = evaluator.evaluate(_context_with(table, edges))
    rng = np.random.default_rng(1)
    repeats = []
    for _ in range(3):
        noisy = table.assign(score=table["score"] + rng.normal(scale=0.5, size=len(table)))
        repeats.append(evaluator.evaluate(_context_with(noisy, edges)))
    out = evaluator.aggregate(repeats, reference)
    nes = np.array([r.metrics["pearson/nes"] for r in repeats])
    assert out["pearson/nes_mse"] == pytest.approx(np.mean((nes - reference.metrics["pearson/nes"]) ** 2))
    assert out["pearson/nes_mse"] > 0


def test_real_pbmc_coexpression_against_alzheimers_biogrid_matches_gseapy(shared_data):
    """Real symbols and the WDS paper's ground truth: pbmc68k_reduced co-expression, top 20,000 pairs."""
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    expression = adata.raw.X.toarray() if hasattr(adata.raw.X, "toarray") else np.asarray(adata.raw.X)
    correlation = np.corrcoef(expression, rowvar=False)
    genes = list(adata.raw.var_names)
    interactions = Interactions.from_matrix(
        np.nan_to_num(correlation), genes, directed=False, extractor="pearson", rank_by="abs"
    )
    gt = shared_data / "ground_truth"
    spec = {
        "source": "file",
        "path": str(gt / "biogrid_3.4.126_human_pairs.tsv"),
        "format": "biogrid",
        "disease_genes": {"path": str(gt / "disgenet_alzheimers_C0002395_gda.tsv")},
    }
    context = RunContext(seed=0)
    context.interactions["pearson"] = interactions
    evaluator = NesEvaluator(
        ground_truth=spec, top_n=20_000, permutations=200, permutation_stream="gseapy", plot=False
    )
    metrics = evaluator.evaluate(context).metrics
    from grnx_plugins.evaluators.ground_truth import GroundTruthSpec, build_ground_truth

    truth = build_ground_truth(GroundTruthSpec(**spec)).pair_set()
    items = interactions.pair_ids()[:20_000]
    assert metrics["pearson/n_hits"] == len(truth.intersection(items)) > 10
    es, nes, p = gseapy_prerank(items, np.arange(len(items) - 1, -1, -1), truth, permutations=200, seed=6)
    assert (metrics["pearson/es"], metrics["pearson/nes"], metrics["pearson/pvalue"]) == (es, nes, p)


def test_counts_and_the_reference_value_are_informational():
    assert NesEvaluator.metric_direction("pearson/nes") is True
    assert NesEvaluator.metric_direction("pearson/pvalue") is False
    for name in ("pearson/n_hits", "pearson/n_items", "pearson/gt_pairs_in_list"):
        assert NesEvaluator.declares(name) and NesEvaluator.metric_direction(name) is None
    for name in ("pearson/n_repeats", "pearson/nes_reference"):
        assert NesStabilityEvaluator.declares(name)
        assert NesStabilityEvaluator.metric_direction(name) is None
    assert NesStabilityEvaluator.metric_direction("pearson/nes_mse") is False
    assert not NesEvaluator.declares("pearson/n_repeats")


STABILITY_RECIPE = """
schema_version: 1
name: stability
data: {name: scanpy_builtin, params: {dataset: krumsiek11}}
extractors: [{name: pearson}]
evaluators: [{name: nes_stability, params: {permutations: 10, plot: false}}]
"""


def test_nes_stability_without_a_sampler_is_refused_at_validation(tmp_path):
    """Without repeats it would report plain NES under a stability name."""
    from grnx_core.errors import RecipeError
    from grnx_core.expansion import expand
    from grnx_core.recipe import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(STABILITY_RECIPE)
    with pytest.raises(RecipeError, match=r"evaluators.0: evaluator 'nes_stability' .* has no sampler"):
        load_recipe(path)
    # sweep points are recipes too: the point without a sampler is named
    with pytest.raises(RecipeError, match=r"has no sampler.*sweep point \{'sampler': None\}"):
        load_recipe(
            path,
            [
                "sampler={name: uniform, params: {fraction: 0.5}, repeats: 2}",
                "sweep={grid: {sampler: [null]}}",
            ],
        )
    # with repeats the plan holds the repeats and the full-data reference, which has no sampler
    resolved = load_recipe(path, ["sampler={name: uniform, params: {fraction: 0.5}, repeats: 2}"])
    (group,) = expand(resolved, resolved.registry).groups
    assert len(group.repeats) == 2 and group.reference is not None
    assert group.reference.resolved.recipe.sampler is None
