"""AUPRC / AUROC / early precision against scikit-learn over explicitly materialised candidate sets,
and against an independent re-implementation of BEELINE's own evaluation code."""

from __future__ import annotations

from itertools import combinations, permutations, product

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from grnx_core import DataError, EvaluationResult, GroundTruth, Interactions, RunContext
from grnx_plugins.evaluators.auprc import AuprcEvaluator, jaccard, top_k_spearman


def make_case(seed, *, n_genes=25, directed=False, fraction_listed=0.6, n_true=30, ties=False, signed=False):
    rng = np.random.default_rng(seed)
    genes = [f"g{i:02d}" for i in range(n_genes)]
    candidates = list(permutations(genes, 2)) if directed else list(combinations(genes, 2))
    order = rng.permutation(len(candidates))
    listed = [candidates[i] for i in order[: int(fraction_listed * len(candidates))]]
    scores = rng.normal(size=len(listed))
    if ties:
        scores = np.round(scores, 1)
    table = pd.DataFrame(
        {"source": [a for a, _ in listed], "target": [b for _, b in listed], "score": scores}
    )
    if signed:
        table["sign"] = rng.choice([-1, 1], size=len(table)).astype(np.int8)
    true = [candidates[i] for i in rng.choice(len(candidates), n_true, replace=False)]
    edges = pd.DataFrame({"source": [a for a, _ in true], "target": [b for _, b in true]})
    if signed:
        edges["sign"] = rng.choice([-1, 1], size=len(edges))
    context = RunContext(seed=0)
    context.interactions["x"] = Interactions(table, directed=directed, extractor="x", genes=genes)
    context.ground_truth = GroundTruth(edges, directed=directed, name="truth")
    return context, candidates


def universe_candidates(context, universe):
    """Every candidate pair of the universe: all pairs of the extractor's genes, or of those of them
    the ground truth names."""
    interactions = context.interactions["x"]
    genes = list(interactions.genes)
    if universe == "truth_genes":
        named = set(context.ground_truth.edges["source"]) | set(context.ground_truth.edges["target"])
        genes = [g for g in genes if g in named]
    return list(permutations(genes, 2)) if interactions.directed else list(combinations(genes, 2))


def dense_labels_scores(context, candidates, *, keep=None):
    """Every candidate with its label and score; unlisted candidates get the lowest score."""
    table = context.interactions["x"].table
    directed = context.interactions["x"].directed
    key = (lambda a, b: (a, b)) if directed else (lambda a, b: tuple(sorted((a, b))))
    score = {key(a, b): s for a, b, s in zip(table["source"], table["target"], table["score"])}
    edges = context.ground_truth.edges
    truth = {key(a, b) for a, b in zip(edges["source"], edges["target"])}
    floor = min(score.values()) - 1.0
    rows = [c for c in candidates if keep is None or keep(c)]
    labels = np.array([key(*c) in truth for c in rows])
    values = np.array([score.get(key(*c), floor) for c in rows])
    return labels, values, int(labels.sum())


def early_precision_by_hand(labels, values, k):
    order = np.argsort(-values, kind="stable")
    cutoff = values[order][k - 1]
    top = values >= cutoff
    return labels[top].sum() / top.sum()


@pytest.mark.parametrize("universe", ["truth_genes", "all_genes"])
@pytest.mark.parametrize(
    ("seed", "directed", "ties"), [(0, False, False), (1, True, False), (2, False, True), (3, True, True)]
)
def test_metrics_equal_sklearn_over_all_candidates(seed, directed, ties, universe):
    # 20 true pairs over 25 genes leave some genes out of the ground truth: the universes differ.
    context, _ = make_case(seed, directed=directed, ties=ties, n_true=20)
    candidates = universe_candidates(context, universe)
    n_genes = len({g for pair in candidates for g in pair})
    assert (n_genes < 25) == (universe == "truth_genes")
    metrics = AuprcEvaluator(universe=universe, plot=False).evaluate(context).metrics
    labels, values, n_true = dense_labels_scores(context, candidates)
    assert metrics[f"x/{universe}/auprc"] == pytest.approx(average_precision_score(labels, values), abs=1e-12)
    assert metrics[f"x/{universe}/auroc"] == pytest.approx(roc_auc_score(labels, values), abs=1e-12)
    precision, recall, _ = precision_recall_curve(labels, values)
    assert metrics[f"x/{universe}/auprc_trapezoid"] == pytest.approx(auc(recall, precision), abs=1e-12)
    density = n_true / len(candidates)
    assert metrics[f"x/{universe}/n_candidates"] == len(candidates)
    assert (
        metrics[f"x/{universe}/universe_genes"] == n_genes and metrics[f"x/{universe}/extractor_genes"] == 25
    )
    assert metrics[f"x/{universe}/auprc_random"] == pytest.approx(density)
    assert metrics[f"x/{universe}/auprc_ratio"] == pytest.approx(metrics[f"x/{universe}/auprc"] / density)
    assert metrics[f"x/{universe}/auprc_trapezoid_ratio"] == pytest.approx(auc(recall, precision) / density)
    ep = early_precision_by_hand(labels, values, n_true)
    assert metrics[f"x/{universe}/early_precision"] == pytest.approx(ep)
    assert metrics[f"x/{universe}/epr"] == pytest.approx(ep / density)
    assert metrics[f"x/{universe}/auroc_random"] == 0.5 and metrics[f"x/{universe}/epr_random"] == 1.0


def test_hand_computed_small_case():
    # 4 genes, 6 undirected candidates; list: AB 0.9, CD 0.8, AC 0.7; truth: AB, AD.
    table = pd.DataFrame({"source": ["A", "C", "A"], "target": ["B", "D", "C"], "score": [0.9, 0.8, 0.7]})
    context = RunContext(seed=0)
    context.interactions["x"] = Interactions(table, directed=False, extractor="x", genes=list("ABCD"))
    context.ground_truth = GroundTruth(
        pd.DataFrame({"source": ["B", "A"], "target": ["A", "D"]}), directed=False, name="t"
    )
    metrics = AuprcEvaluator(universe="all_genes", plot=False).evaluate(context).metrics
    # thresholds: AB (tp1 fp0), CD (1,1), AC (1,2), rest {AD, BC, BD} tied (2,4)
    # AP = 1/2 * 1 + 1/2 * 2/6
    assert metrics["x/all_genes/auprc"] == pytest.approx(0.5 + 0.5 * 2 / 6)
    # ROC points (0,0) (0,.5) (.25,.5) (.5,.5) (1,1): area = .5*.5 + trapezoid(.5..1 over .5) = .125+.25+.5*.5*.5
    assert metrics["x/all_genes/auroc"] == pytest.approx(0.25 + 0.25 + 0.125)
    # k = 2: top-2 = AB, CD -> EP 1/2; density 2/6
    assert metrics["x/all_genes/early_precision"] == pytest.approx(0.5)
    assert metrics["x/all_genes/epr"] == pytest.approx(1.5)


def test_tf_restricted_universe(tmp_path):
    context, candidates = make_case(4, directed=True, n_true=40)
    tfs = ["g00", "g03", "g07", "g11"]
    tf_file = tmp_path / "tfs.txt"
    tf_file.write_text("\n".join(tfs) + "\n")
    metrics = AuprcEvaluator(tf_list=str(tf_file), universe="all_genes", plot=False).evaluate(context).metrics
    labels, values, n_true = dense_labels_scores(context, candidates, keep=lambda c: c[0] in tfs)
    assert metrics["x/all_genes_tf/n_candidates"] == len(tfs) * 24
    assert metrics["x/all_genes_tf/gt_pairs_in_universe"] == n_true
    assert metrics["x/all_genes_tf/auprc"] == pytest.approx(
        average_precision_score(labels, values), abs=1e-12
    )
    assert metrics["x/all_genes_tf/auroc"] == pytest.approx(roc_auc_score(labels, values), abs=1e-12)


def test_tf_list_csv_with_tf_column(tmp_path):
    context, candidates = make_case(5, directed=False, n_true=40)
    tf_file = tmp_path / "tfs.csv"
    tf_file.write_text("TF,Sources\ng01,x\ng02,y\n")
    metrics = AuprcEvaluator(tf_list=str(tf_file), universe="all_genes", plot=False).evaluate(context).metrics
    keep = lambda c: c[0] in ("g01", "g02") or c[1] in ("g01", "g02")  # noqa: E731
    labels, values, _ = dense_labels_scores(context, candidates, keep=keep)
    assert metrics["x/all_genes_tf/n_candidates"] == sum(1 for c in candidates if keep(c))
    assert metrics["x/all_genes_tf/auprc"] == pytest.approx(
        average_precision_score(labels, values), abs=1e-12
    )


def test_signed_edges():
    context, candidates = make_case(6, directed=True, signed=True, n_true=50, fraction_listed=0.9)
    metrics = AuprcEvaluator(signed=True, universe="all_genes", plot=False).evaluate(context).metrics
    # candidates are (pair, sign); a listed pair scores its predicted sign only
    table = context.interactions["x"].table
    listed = {
        (a, b, s): v for a, b, s, v in zip(table["source"], table["target"], table["sign"], table["score"])
    }
    edges = context.ground_truth.edges
    truth = set(zip(edges["source"], edges["target"], edges["sign"]))
    floor = table["score"].min() - 1
    signed = [(a, b, s) for a, b in candidates for s in (-1, 1)]
    labels = np.array([c in truth for c in signed])
    values = np.array([listed.get(c, floor) for c in signed])
    assert metrics["x/all_genes_signed/n_candidates"] == len(signed)
    assert metrics["x/all_genes_signed/auprc"] == pytest.approx(
        average_precision_score(labels, values), abs=1e-12
    )
    assert metrics["x/all_genes_signed/auroc"] == pytest.approx(roc_auc_score(labels, values), abs=1e-12)
    assert metrics["x/all_genes_signed/early_precision"] == pytest.approx(
        early_precision_by_hand(labels, values, 50)
    )
    unsigned = AuprcEvaluator(universe="all_genes", plot=False).evaluate(context).metrics
    # wrong-sign hits stop counting
    assert unsigned["x/all_genes/auprc"] > metrics["x/all_genes_signed/auprc"]


def test_signed_without_signs_is_a_clear_error():
    context, _ = make_case(7)
    with pytest.raises(DataError, match="needs signs on both sides"):
        AuprcEvaluator(signed=True, plot=False).evaluate(context)


def test_directed_ground_truth_against_undirected_list_is_scored_undirected():
    context, _ = make_case(8, directed=False)
    truth = context.ground_truth
    context.ground_truth = GroundTruth(
        truth.edges[["target", "source"]].set_axis(["source", "target"], axis=1),
        directed=True,
        name="reversed",
    )
    flipped = AuprcEvaluator(plot=False).evaluate(context).metrics
    context.ground_truth = truth
    assert (
        flipped["x/truth_genes/auprc"]
        == AuprcEvaluator(plot=False).evaluate(context).metrics["x/truth_genes/auprc"]
    )


def test_perfect_ranking_scores_one():
    context, candidates = make_case(9, fraction_listed=1.0)
    edges = context.ground_truth.edges
    truth = set(zip(edges["source"], edges["target"]))
    table = context.interactions["x"].table.copy()
    table["score"] = [
        1.0 + 0.001 * i if (a, b) in truth else 0.001 * i
        for i, (a, b) in enumerate(zip(table["source"], table["target"]))
    ]
    context.interactions["x"] = Interactions(
        table, directed=False, extractor="x", genes=context.interactions["x"].genes
    )
    result = AuprcEvaluator().evaluate(context)
    assert result.metrics["x/truth_genes/auprc"] == pytest.approx(1.0)
    assert result.metrics["x/truth_genes/auroc"] == pytest.approx(1.0)
    assert result.metrics["x/truth_genes/early_precision"] == pytest.approx(1.0)
    assert "x_pr_roc" in result.figures


def test_stability_aggregate_contract():
    evaluator = AuprcEvaluator(stability_top_k=3, plot=False)
    contexts = [make_case(10, fraction_listed=1.0)[0] for _ in range(2)]
    results = [evaluator.evaluate(c) for c in contexts]
    assert len(results[0].state["top_pairs"]["x/truth_genes"]) == 3
    assert not any("top_k" in k for k in results[0].metrics)  # pair identities are state, not metrics
    assert all(AuprcEvaluator.declares(k) for k in results[0].metrics)
    same = evaluator.aggregate(results, results[0])
    assert same["x/truth_genes/top_k_jaccard"] == 1.0
    assert same["x/truth_genes/top_k_spearman"] == pytest.approx(1.0)
    assert same["x/truth_genes/top_k_jaccard_reference"] == 1.0
    # hand-built lists: {p1..p5} vs {p2,p1,p3,p5,p6}: Jaccard 4/6
    a = EvaluationResult(
        {"x/truth_genes/auprc": 0.2}, state={"top_pairs": {"x/truth_genes": ["p1", "p2", "p3", "p4", "p5"]}}
    )
    b = EvaluationResult(
        {"x/truth_genes/auprc": 0.4}, state={"top_pairs": {"x/truth_genes": ["p2", "p1", "p3", "p5", "p6"]}}
    )
    out = evaluator.aggregate([a, b], None)
    assert out["x/truth_genes/top_k_jaccard"] == pytest.approx(4 / 6)
    # shared p1,p2,p3,p5 ranked [0,1,2,4] in a and [1,0,2,3] in b: Spearman of ranks = 1 - 6*2/(4*15) = 0.8
    assert out["x/truth_genes/top_k_spearman"] == pytest.approx(0.8)
    assert "x/truth_genes/top_k_jaccard_reference" not in out
    assert jaccard(["p1"], ["p2"]) == 0.0
    assert np.isnan(top_k_spearman(["p1", "p2", "p3"], ["p4", "p5", "p6"]))  # nothing shared


def test_top_pairs_identify_pairs_whichever_way_they_are_written():
    context, _ = make_case(11, fraction_listed=1.0)
    evaluator = AuprcEvaluator(stability_top_k=5, plot=False)
    first = evaluator.evaluate(context).state["top_pairs"]["x/truth_genes"]
    reversed_table = context.interactions["x"].table.copy()  # same pairs written B|A
    reversed_table[["source", "target"]] = reversed_table[["target", "source"]].to_numpy()
    context.interactions["x"] = Interactions(
        reversed_table, directed=False, extractor="x", genes=context.interactions["x"].genes
    )
    second = evaluator.evaluate(context).state["top_pairs"]["x/truth_genes"]
    assert first == second and len(set(first)) == 5


def test_directed_list_scored_undirected_keeps_the_better_copy_of_each_pair():
    # A->B and B->A both listed; the undirected ground truth sees pair A|B once, at its best rank.
    table = pd.DataFrame(
        {"source": ["C", "A", "B", "D"], "target": ["D", "B", "A", "A"], "score": [0.9, 0.8, 0.7, 0.1]}
    )
    context = RunContext(seed=0)
    context.interactions["x"] = Interactions(table, directed=True, extractor="x", genes=list("ABCD"))
    context.ground_truth = GroundTruth(
        pd.DataFrame({"source": ["A"], "target": ["B"]}), directed=False, name="t"
    )
    metrics = AuprcEvaluator(universe="all_genes", plot=False).evaluate(context).metrics
    assert metrics["x/all_genes/n_candidates"] == 6  # undirected
    # ranked unique pairs: CD, AB, AD (+3 unlisted): AP = precision at AB = 1/2
    assert metrics["x/all_genes/auprc"] == pytest.approx(0.5)
    assert metrics["x/all_genes/early_precision"] == 0.0  # k = 1: top-1 is CD


def test_random_best_and_baseline_values_and_counts_are_informational():
    """They describe the ground truth, the universe and the list: no direction to optimise or
    compare; the metrics and their ratios (to random, to the baseline) are higher-is-better."""
    context = with_baseline(make_case(3)[0])
    result = AuprcEvaluator(plot=False, baseline_extractor="base").evaluate(context)
    informational = {"n_candidates", "extractor_genes", "genes_shared_with_base"}
    informational |= {f"{m}_{kind}" for m in ALL_METRICS for kind in ("random", "best")}
    informational |= {"auprc_of_base", "auroc_of_base", "epr_of_base"}
    informational |= {"gt_edges", "gt_pairs_in_universe", "gt_genes_in_universe", "universe_genes"}
    informational |= {"gt_pairs_in_list", "gt_signed_pairs_in_universe"}
    scored = set(ALL_METRICS) | {"auprc_ratio", "auprc_trapezoid_ratio"}
    scored |= {"auprc_vs_base", "auroc_vs_base", "epr_vs_base"}
    leaves = {name.rsplit("/", 1)[1] for name in result.metrics if name.startswith("x/")}
    assert leaves == (informational - {"gt_signed_pairs_in_universe"}) | scored
    for name in result.metrics:
        assert AuprcEvaluator.declares(name), name
        metric = name.rsplit("/", 1)[1]
        expected = None if metric in informational else True
        assert AuprcEvaluator.metric_direction(name) is expected, name
    assert not AuprcEvaluator.declares("x/truth_genes/auprc_vs_") and not AuprcEvaluator.declares("x/mystery")


# -- BEELINE's own evaluation, re-implemented from its code -----------------------------------------
# Murali-group/Beeline at d6492f152e57eebcb229bf07a6341fbf56e50af9 (the last commit with the classic
# BLEval): BLEval/computeAUC.py `computeScores` as `PRROC` calls it (selfEdges=False), and
# BLEval/computeEarlyPrec.py `EarlyPrec`; the 2026 rewrite (BLEval/AUPRC.py, EarlyPrecision.py)
# keeps the same definitions. BLRun/pearsonRunner.py writes the ranked edges.


def beeline_auprc_auroc(
    true_edges: pd.DataFrame, ranked: pd.DataFrame, directed: bool
) -> tuple[float, float]:
    """computeScores: candidates are all pairs of distinct genes of the ground truth (ordered when
    directed); a candidate's score is |EdgeWeight| of its first row in the ranked file (undirected:
    the larger of both orientations), 0 when absent; AUPRC = auc(recall, precision)."""
    genes = np.unique(true_edges.loc[:, ["Gene1", "Gene2"]])
    weight: dict = {}
    if directed:
        possible = list(permutations(genes, 2))
        truth = set(zip(true_edges["Gene1"], true_edges["Gene2"]))
        for a, b, w in zip(ranked["Gene1"], ranked["Gene2"], ranked["EdgeWeight"]):
            weight.setdefault((a, b), abs(w))
        labels = [int(edge in truth) for edge in possible]
        scores = [weight.get(edge, 0.0) for edge in possible]
    else:
        possible = list(combinations(genes, 2))
        truth = {frozenset(edge) for edge in zip(true_edges["Gene1"], true_edges["Gene2"])}
        for a, b, w in zip(ranked["Gene1"], ranked["Gene2"], ranked["EdgeWeight"]):
            key = frozenset((a, b))
            weight[key] = max(weight.get(key, 0.0), abs(w))
        labels = [int(frozenset(edge) in truth) for edge in possible]
        scores = [weight.get(frozenset(edge), 0.0) for edge in possible]
    precision, recall, _ = precision_recall_curve(labels, scores)
    fpr, tpr, _ = roc_curve(labels, scores)
    return auc(recall, precision), auc(fpr, tpr)


def beeline_epr(true_edges: pd.DataFrame, ranked: pd.DataFrame, tf_edges: bool) -> float:
    """EarlyPrec: k = number of true edges (self-edges and repeats dropped); the top k of the ranked
    file by |EdgeWeight| rounded to 6 decimals, ties at the k-th weight included, weight 0 never;
    divided by the random precision k / |possible edges|. TFEdges: possible edges leave a source
    gene of the ground truth, and predictions outside them are dropped."""
    truth = true_edges.loc[true_edges["Gene1"] != true_edges["Gene2"]].drop_duplicates(keep="first")
    predicted = ranked.loc[ranked["Gene1"] != ranked["Gene2"]].drop_duplicates(keep="first")
    nodes = np.unique(truth.loc[:, ["Gene1", "Gene2"]])
    if tf_edges:
        possible = set(product(set(truth["Gene1"]), set(nodes))) & set(permutations(nodes, 2))
        keys = {"|".join(edge) for edge in possible}
        true = truth["Gene1"] + "|" + truth["Gene2"]
        true = true[true.isin(keys)]
        n_edges = len(true)
        predicted = predicted[(predicted["Gene1"] + "|" + predicted["Gene2"]).isin(keys)]
    else:
        possible = set(permutations(nodes, 2))
        true = set(truth["Gene1"] + "|" + truth["Gene2"])
        n_edges = len(true)
    weights = predicted["EdgeWeight"].round(6).abs()
    kth = weights.iloc[min(len(predicted), n_edges) - 1]
    cutoff = max(np.nanmin(weights.replace(0, np.nan).to_numpy()), kth)
    chosen = predicted.loc[weights >= cutoff]
    selected = set(chosen["Gene1"] + "|" + chosen["Gene2"])
    return len(selected.intersection(true)) / len(selected) / (n_edges / len(possible))


def beeline_pearson_ranked_edges(expression: pd.DataFrame) -> pd.DataFrame:
    """BLRun/pearsonRunner.py: genes x cells scaled by each gene's maximum, Pearson between genes,
    every ordered pair of distinct genes (both orientations, same weight) by |r| descending."""
    scaled = expression.div(expression.max(axis=1).replace(0, 1), axis=0)
    stacked = scaled.T.corr(method="pearson").stack().reset_index()
    stacked.columns = ["Gene1", "Gene2", "EdgeWeight"]
    edges = stacked[stacked["Gene1"] != stacked["Gene2"]]
    return edges.iloc[np.argsort(-edges["EdgeWeight"].abs().to_numpy(), kind="stable")]


def grnx_metrics(context, **params) -> dict[str, float]:
    return AuprcEvaluator(plot=False, **params).evaluate(context).metrics


def test_undirected_pairs_scored_directed_count_in_both_orientations():
    """The stored orientation of an undirected pair (gene order in the input) must not matter."""
    rng = np.random.default_rng(12)
    genes = [f"g{i:02d}" for i in range(12)]
    pairs = list(combinations(genes, 2))
    scores = rng.random(len(pairs)) + 0.01
    table = pd.DataFrame({"source": [a for a, _ in pairs], "target": [b for _, b in pairs], "score": scores})
    flipped = table.copy()
    swap = rng.random(len(table)) < 0.5
    flipped.loc[swap, ["source", "target"]] = flipped.loc[swap, ["target", "source"]].to_numpy()
    ordered = list(permutations(genes, 2))
    true = [ordered[i] for i in rng.choice(len(ordered), 25, replace=False)]
    truth = GroundTruth(
        pd.DataFrame({"source": [a for a, _ in true], "target": [b for _, b in true]}),
        directed=True,
        name="t",
    )
    results = []
    for stored in (table, flipped):
        context = RunContext(seed=0)
        context.interactions["x"] = Interactions(stored, directed=False, extractor="x", genes=genes)
        context.ground_truth = truth
        results.append(grnx_metrics(context, directed="directed"))
    assert results[0] == results[1]
    # dense check: every ordered pair carries its unordered pair's score
    score = {frozenset(p): s for p, s in zip(pairs, scores)}
    labels = np.array([pair in set(true) for pair in ordered])
    values = np.array([score[frozenset(pair)] for pair in ordered])
    assert results[0]["x/truth_genes/auprc"] == pytest.approx(
        average_precision_score(labels, values), abs=1e-12
    )
    assert results[0]["x/truth_genes/auroc"] == pytest.approx(roc_auc_score(labels, values), abs=1e-12)
    assert (
        results[0]["x/truth_genes/n_candidates"] == len(ordered)
        and results[0]["x/truth_genes/gt_pairs_in_list"] == 25
    )


def small_beeline_case(seed: int, extra_genes: int):
    """A directed ground truth with reciprocal edges over 10 genes, expression of those genes (and
    ``extra_genes`` the ground truth does not name), and the same data as grnx sees it."""
    rng = np.random.default_rng(seed)
    named = [f"G{i}" for i in range(10)]
    genes = named + [f"X{i}" for i in range(extra_genes)]
    expression = pd.DataFrame(rng.gamma(2.0, size=(len(genes), 60)), index=genes)
    ordered = list(permutations(named, 2))
    true = [ordered[i] for i in rng.choice(len(ordered), 24, replace=False)]
    true += [(b, a) for a, b in true[:6]]  # reciprocal edges, and repeats of them
    true_edges = pd.DataFrame(true, columns=["Gene1", "Gene2"])
    corr = np.corrcoef(expression.to_numpy())
    context = RunContext(seed=0)
    context.interactions["x"] = Interactions.from_matrix(
        corr, genes, directed=False, extractor="x", rank_by="abs"
    )
    context.ground_truth = GroundTruth(
        true_edges.set_axis(["source", "target"], axis=1), directed=True, name="beeline"
    )
    return context, true_edges, beeline_pearson_ranked_edges(expression)


@pytest.mark.parametrize("extra_genes", [0, 5])
def test_equals_beeline_on_a_small_case_with_both_orientations(extra_genes):
    context, true_edges, ranked = small_beeline_case(13, extra_genes)
    for mode in ("directed", "undirected"):
        metrics = grnx_metrics(context, directed=mode)
        expected_auprc, expected_auroc = beeline_auprc_auroc(true_edges, ranked, directed=mode == "directed")
        assert metrics["x/truth_genes/auprc_trapezoid"] == pytest.approx(expected_auprc, abs=1e-12), mode
        assert metrics["x/truth_genes/auroc"] == pytest.approx(expected_auroc, abs=1e-12), mode
        assert (
            metrics["x/truth_genes/universe_genes"] == 10
            and metrics["x/truth_genes/extractor_genes"] == 10 + extra_genes
        )
    # BEELINE's EPR without TFEdges ranks predictions of genes outside the ground truth too: the
    # same as grnx's only when there are none.
    if extra_genes == 0:
        epr = grnx_metrics(context, directed="directed")["x/truth_genes/epr"]
        assert epr == pytest.approx(beeline_epr(true_edges, ranked, tf_edges=False), abs=1e-12)
    epr_tf = grnx_metrics(context, directed="directed", tf_edges=True)["x/truth_genes_tfedges/epr"]
    assert epr_tf == pytest.approx(beeline_epr(true_edges, ranked, tf_edges=True), abs=1e-12)


def beeline_dataset_against_reference(expression_file, network_file, tf_edges: bool):
    from grnx_plugins.data.csv_matrix import CsvMatrix
    from grnx_plugins.extractors.pearson import PearsonExtractor

    expression = pd.read_csv(expression_file, index_col=0)
    true_edges = pd.read_csv(network_file)
    ranked = beeline_pearson_ranked_edges(expression)
    context = RunContext(seed=0, adata=CsvMatrix(path=str(expression_file)).load())
    context.interactions["pearson"] = PearsonExtractor(rank_by="abs").extract(context)
    truth = {"source": "file", "path": str(network_file), "format": "beeline"}
    measured = {}
    # rel 1e-6: pandas' and grnx's Pearson differ in the last bits, which can swap nearly tied pairs.
    for mode in ("directed", "undirected"):
        metrics = grnx_metrics(context, ground_truth=truth, directed=mode)
        expected_auprc, expected_auroc = beeline_auprc_auroc(true_edges, ranked, directed=mode == "directed")
        assert metrics["pearson/truth_genes/auprc_trapezoid"] == pytest.approx(expected_auprc, rel=1e-6), mode
        assert metrics["pearson/truth_genes/auroc"] == pytest.approx(expected_auroc, rel=1e-6), mode
        measured[mode] = metrics
    if tf_edges:
        epr = grnx_metrics(context, ground_truth=truth, directed="directed", tf_edges=True)[
            "pearson/truth_genes_tfedges/epr"
        ]
    else:
        epr = measured["directed"]["pearson/truth_genes/epr"]
    assert epr == pytest.approx(beeline_epr(true_edges, ranked, tf_edges=tf_edges), rel=1e-6)
    return measured


def test_equals_beeline_on_its_gsd_simulation(shared_data):
    """BEELINE's GSD curated model (19 genes, 2,000 cells; 79 signed edges, 39 of them reciprocal)."""
    folder = shared_data / "scrna" / "beeline_gsd_example"
    measured = beeline_dataset_against_reference(
        folder / "ex1" / "ExpressionData.csv", folder / "GroundTruthNetwork.csv", tf_edges=False
    )
    # Measured against the reference above: directed AUPRC 0.2753, AUROC 0.5771 (before the fix,
    # which kept each undirected pair in one orientation only: 0.2401, 0.5168).
    assert measured["directed"]["pearson/truth_genes/auprc_trapezoid"] == pytest.approx(0.2753, abs=1e-4)
    assert measured["directed"]["pearson/truth_genes/universe_genes"] == 19


@pytest.mark.slow
def test_equals_beeline_on_mouse_dendritic_cells(shared_data):
    """BEELINE's mDC data (821 genes, 383 cells) against its cell-type-specific ChIP-seq network
    (448 of the genes): the universe is the ground truth's genes, EPR with TFEdges (BEELINE's
    setting for experimental data)."""
    folder = shared_data / "scrna" / "beeline_mdc" / "Specific"
    measured = beeline_dataset_against_reference(
        folder / "ExpressionData.csv", folder / "network.csv", tf_edges=True
    )
    assert measured["directed"]["pearson/truth_genes/universe_genes"] == 448
    assert measured["directed"]["pearson/truth_genes/extractor_genes"] == 821


def test_universe_is_named_in_the_overlap_table_and_every_candidate_true_is_refused():
    context, _ = make_case(14, n_true=20)
    result = AuprcEvaluator(plot=False).evaluate(context)
    row = result.tables["ground_truth_overlap"].iloc[0]
    assert row["universe"] == "truth_genes"
    n_genes = int(result.metrics["x/truth_genes/universe_genes"])
    assert row["universe_description"] == f"ground-truth genes scored by x ({n_genes} of 25 genes)"
    table = pd.DataFrame({"source": ["A"], "target": ["B"], "score": [1.0]})
    context.interactions["x"] = Interactions(table, directed=False, extractor="x", genes=list("ABC"))
    context.ground_truth = GroundTruth(
        pd.DataFrame({"source": ["A"], "target": ["B"]}), directed=False, name="t"
    )
    with pytest.raises(DataError, match="every one of the 1 candidate pairs"):
        AuprcEvaluator(plot=False).evaluate(context)
    assert (
        AuprcEvaluator(universe="all_genes", plot=False).evaluate(context).metrics["x/all_genes/n_candidates"]
        == 3
    )


def test_tf_edges_needs_a_directed_ground_truth_and_excludes_tf_list(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="set one of them"):
        AuprcEvaluator(tf_edges=True, tf_list=str(tmp_path / "tfs.txt"))
    context, _ = make_case(15)
    with pytest.raises(DataError, match="is undirected, so its pairs have no source"):
        AuprcEvaluator(tf_edges=True, plot=False).evaluate(context)


# -- universe tags, best achievable values and a baseline extractor ----------------------------------

ALL_METRICS = ("auprc", "auprc_trapezoid", "auroc", "early_precision", "epr")


def with_baseline(context, *, seed=99, drop_genes=(), directed=None):
    """The case plus extractor "base": other random scores over every pair of the same genes (less
    ``drop_genes``), undirected unless ``directed``."""
    rng = np.random.default_rng(seed)
    genes = [g for g in context.interactions["x"].genes if g not in drop_genes]
    directed = context.interactions["x"].directed if directed is None else directed
    pairs = list(permutations(genes, 2)) if directed else list(combinations(genes, 2))
    table = pd.DataFrame(
        {
            "source": [a for a, _ in pairs],
            "target": [b for _, b in pairs],
            "score": rng.normal(size=len(pairs)),
        }
    ).sort_values("score", ascending=False, ignore_index=True)
    context.interactions["base"] = Interactions(table, directed=directed, extractor="base", genes=genes)
    return context


@pytest.mark.parametrize(
    ("params", "tag"),
    [
        ({}, "truth_genes"),
        ({"universe": "all_genes"}, "all_genes"),
        ({"tf_edges": True}, "truth_genes_tfedges"),
        ({"tf_list": "TFS", "universe": "all_genes"}, "all_genes_tf"),
        ({"signed": True}, "truth_genes_signed"),
        ({"tf_edges": True, "signed": True, "universe": "all_genes"}, "all_genes_tfedges_signed"),
    ],
)
def test_metric_keys_name_the_universe(tmp_path, params, tag):
    context, _ = make_case(16, directed=True, signed=True, n_true=40)
    if params.get("tf_list") == "TFS":
        (tmp_path / "tfs.txt").write_text("g00\ng05\ng09\n")
        params = {**params, "tf_list": str(tmp_path / "tfs.txt")}
    evaluator = AuprcEvaluator(plot=False, stability_top_k=4, **params)
    assert evaluator.universe_tag == tag
    result = evaluator.evaluate(context)
    assert all(name.startswith(f"x/{tag}/") and name.count("/") == 2 for name in result.metrics)
    assert result.tables["ground_truth_overlap"]["universe_tag"].tolist() == [tag]
    aggregated = evaluator.aggregate([result, result], result)
    assert set(aggregated) == {
        f"x/{tag}/top_k_{m}{r}" for m in ("jaccard", "spearman") for r in ("", "_reference")
    }


def brute_force_best(labels_by_pair: dict, listed: list, n_true: int) -> dict[str, float]:
    """The best of every ordering of the listed pairs, each scored with scikit-learn over the whole
    universe (unlisted pairs tied below), early precision over the top min(k, listed) pairs.
    Orderings with the same sequence of labels score alike, so one of each is scored."""
    universe = list(labels_by_pair)
    labels = np.array([labels_by_pair[c] for c in universe])
    best = dict.fromkeys(("auprc", "auprc_trapezoid", "auroc", "early_precision"), -np.inf)
    seen = set()
    for order in permutations(range(len(listed))):
        pattern = tuple(labels_by_pair[listed[i]] for i in order)
        if pattern in seen:
            continue
        seen.add(pattern)
        rank_score = {listed[i]: len(listed) - r for r, i in enumerate(order)}
        values = np.array([rank_score.get(c, 0) for c in universe], dtype=float)
        precision, recall, _ = precision_recall_curve(labels, values)
        top = list(pattern)[: min(n_true, len(listed))]
        found = {
            "auprc": average_precision_score(labels, values),
            "auprc_trapezoid": auc(recall, precision),
            "auroc": roc_auc_score(labels, values),
            "early_precision": float(np.mean(top)),
        }
        best = {k: max(best[k], found[k]) for k in best}
    best["epr"] = best["early_precision"] / (n_true / len(universe))
    return best


@pytest.mark.parametrize(
    ("seed", "directed", "n_listed", "n_true"),
    [(17, False, 7, 4), (18, True, 6, 9), (19, False, 5, 6), (20, True, 7, 3)],
)
def test_best_achievable_equals_the_best_of_every_ordering_of_the_list(seed, directed, n_listed, n_true):
    """A short list (some cases shorter than k = number of true pairs) over a small universe."""
    rng = np.random.default_rng(seed)
    genes = list("ABCDE")
    candidates = list(permutations(genes, 2)) if directed else list(combinations(genes, 2))
    order = rng.permutation(len(candidates))
    truth = [candidates[i] for i in order[:n_true]]
    listed = [candidates[i] for i in rng.permutation(order[: n_true + 4])[:n_listed]]  # some true, some not
    table = pd.DataFrame(
        {
            "source": [a for a, _ in listed],
            "target": [b for _, b in listed],
            "score": np.arange(n_listed, 0, -1.0),
        }
    )
    context = RunContext(seed=0)
    context.interactions["x"] = Interactions(table, directed=directed, extractor="x", genes=genes)
    context.ground_truth = GroundTruth(
        pd.DataFrame({"source": [a for a, _ in truth], "target": [b for _, b in truth]}),
        directed=directed,
        name="t",
    )
    metrics = grnx_metrics(context, universe="all_genes")
    expected = brute_force_best({c: c in set(truth) for c in candidates}, listed, n_true)
    for metric, value in expected.items():
        assert metrics[f"x/all_genes/{metric}_best"] == pytest.approx(value, abs=1e-12), metric
    # the closed form of the docstring: h/P + (P - h)/N
    h = sum(c in set(truth) for c in listed)
    assert metrics["x/all_genes/auprc_best"] == pytest.approx(h / n_true + (n_true - h) / len(candidates))
    assert metrics["x/all_genes/auprc"] <= metrics["x/all_genes/auprc_best"]


def test_best_achievable_of_a_list_covering_every_candidate_is_perfect():
    context, _ = make_case(21, fraction_listed=1.0, n_true=20)
    metrics = grnx_metrics(context, universe="all_genes")
    for metric in ("auprc", "auprc_trapezoid", "auroc", "early_precision"):
        assert metrics[f"x/all_genes/{metric}_best"] == pytest.approx(1.0), metric
    assert metrics["x/all_genes/epr_best"] == pytest.approx(1 / metrics["x/all_genes/auprc_random"])


def scored_alone(context, extractor, keep_genes=None, **params) -> dict[str, float]:
    """``extractor`` scored by itself, its list and genes narrowed to ``keep_genes`` first."""
    interactions = context.interactions[extractor]
    alone = RunContext(seed=0)
    alone.ground_truth = context.ground_truth
    table, genes = interactions.table, list(interactions.genes)
    if keep_genes is not None:
        table = table[table["source"].isin(keep_genes) & table["target"].isin(keep_genes)]
        genes = [g for g in genes if g in keep_genes]
    alone.interactions[extractor] = Interactions(
        table.reset_index(drop=True), directed=interactions.directed, extractor=extractor, genes=genes
    )
    return grnx_metrics(alone, **params)


@pytest.mark.parametrize("universe", ["truth_genes", "all_genes"])
def test_baseline_ratio_equals_scoring_the_baseline_alone_on_the_same_pairs(universe):
    context = with_baseline(make_case(22, n_true=20)[0])
    metrics = grnx_metrics(context, universe=universe, baseline_extractor="base")
    own, base = (
        scored_alone(context, "x", universe=universe),
        scored_alone(context, "base", universe=universe),
    )
    prefix = f"x/{universe}"
    for metric in ("auprc", "auroc", "epr"):
        assert metrics[f"{prefix}/{metric}_of_base"] == pytest.approx(
            base[f"base/{universe}/{metric}"], abs=1e-12
        )
        ratio = own[f"{prefix}/{metric}"] / base[f"base/{universe}/{metric}"]
        assert metrics[f"{prefix}/{metric}_vs_base"] == pytest.approx(ratio, rel=1e-12)
    assert metrics[f"{prefix}/genes_shared_with_base"] == metrics[f"{prefix}/universe_genes"]
    assert not any(name.startswith("base/") and "_vs_" in name for name in metrics)  # not against itself


def test_baseline_missing_genes_narrows_both_lists_to_the_shared_genes():
    context, _ = make_case(23, n_true=30)
    dropped = ("g01", "g04", "g07")
    with_baseline(context, drop_genes=dropped)
    metrics = grnx_metrics(context, universe="all_genes", baseline_extractor="base")
    shared = [g for g in context.interactions["x"].genes if g not in dropped]
    own = scored_alone(context, "x", keep_genes=shared, universe="all_genes")
    base = scored_alone(context, "base", universe="all_genes")
    assert metrics["x/all_genes/genes_shared_with_base"] == len(shared) == 22
    assert metrics["x/all_genes/universe_genes"] == 25  # the extractor's own figures keep its universe
    for metric in ("auprc", "auroc", "epr"):
        assert metrics[f"x/all_genes/{metric}_of_base"] == pytest.approx(base[f"base/all_genes/{metric}"])
        ratio = own[f"x/all_genes/{metric}"] / base[f"base/all_genes/{metric}"]
        assert metrics[f"x/all_genes/{metric}_vs_base"] == pytest.approx(ratio, rel=1e-12)


def test_baseline_is_scored_with_the_extractors_pair_orientation():
    """A directed extractor against a directed truth is scored over ordered pairs; so is the
    undirected baseline beside it (each of its pairs predicting both orientations)."""
    context = with_baseline(make_case(24, directed=True, n_true=40)[0], directed=False)
    metrics = grnx_metrics(context, baseline_extractor="base")
    base = scored_alone(context, "base", directed="directed")
    assert metrics["x/truth_genes/n_candidates"] == base["base/truth_genes/n_candidates"]
    assert metrics["x/truth_genes/auprc_of_base"] == pytest.approx(base["base/truth_genes/auprc"])
    undirected = scored_alone(context, "base")  # auto: an undirected list is scored undirected
    assert undirected["base/truth_genes/n_candidates"] < base["base/truth_genes/n_candidates"]


def test_baseline_that_is_not_an_extractor_of_the_run_is_a_clear_error():
    context, _ = make_case(25)
    with pytest.raises(
        DataError, match=r"baseline_extractor is 'pearson', which is not an extractor of this run"
    ):
        grnx_metrics(context, baseline_extractor="pearson")


def test_a_ratio_over_a_baseline_value_of_zero_is_nan():
    # truth AB; x ranks AB first, the baseline lists AB last of its 3 pairs: its EPR (k = 1) is 0
    genes = list("ABCD")
    truth = GroundTruth(pd.DataFrame({"source": ["A"], "target": ["B"]}), directed=False, name="t")
    context = RunContext(seed=0)
    context.ground_truth = truth
    for name, order in (("x", ["AB", "CD", "AC"]), ("base", ["CD", "AC", "AB"])):
        table = pd.DataFrame(
            {"source": [p[0] for p in order], "target": [p[1] for p in order], "score": [3.0, 2, 1]}
        )
        context.interactions[name] = Interactions(table, directed=False, extractor=name, genes=genes)
    metrics = grnx_metrics(context, universe="all_genes", baseline_extractor="base")
    assert metrics["x/all_genes/epr_of_base"] == 0.0 and np.isnan(metrics["x/all_genes/epr_vs_base"])
    assert metrics["x/all_genes/auprc_vs_base"] == pytest.approx(1.0 / (1 / 3))
