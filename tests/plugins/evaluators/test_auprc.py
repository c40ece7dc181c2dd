"""AUPRC / AUROC / early precision against scikit-learn over explicitly materialised candidate sets."""

from __future__ import annotations

from itertools import combinations, permutations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

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


@pytest.mark.parametrize(
    ("seed", "directed", "ties"), [(0, False, False), (1, True, False), (2, False, True), (3, True, True)]
)
def test_metrics_equal_sklearn_over_all_candidates(seed, directed, ties):
    context, candidates = make_case(seed, directed=directed, ties=ties)
    metrics = AuprcEvaluator(plot=False).evaluate(context).metrics
    labels, values, n_true = dense_labels_scores(context, candidates)
    assert metrics["x/auprc"] == pytest.approx(average_precision_score(labels, values), abs=1e-12)
    assert metrics["x/auroc"] == pytest.approx(roc_auc_score(labels, values), abs=1e-12)
    precision, recall, _ = precision_recall_curve(labels, values)
    assert metrics["x/auprc_trapezoid"] == pytest.approx(auc(recall, precision), abs=1e-12)
    density = n_true / len(candidates)
    assert metrics["x/n_candidates"] == len(candidates)
    assert metrics["x/auprc_random"] == pytest.approx(density)
    ep = early_precision_by_hand(labels, values, n_true)
    assert metrics["x/early_precision"] == pytest.approx(ep)
    assert metrics["x/epr"] == pytest.approx(ep / density)
    assert metrics["x/auroc_random"] == 0.5 and metrics["x/epr_random"] == 1.0


def test_hand_computed_small_case():
    # 4 genes, 6 undirected candidates; list: AB 0.9, CD 0.8, AC 0.7; truth: AB, AD.
    table = pd.DataFrame({"source": ["A", "C", "A"], "target": ["B", "D", "C"], "score": [0.9, 0.8, 0.7]})
    context = RunContext(seed=0)
    context.interactions["x"] = Interactions(table, directed=False, extractor="x", genes=list("ABCD"))
    context.ground_truth = GroundTruth(
        pd.DataFrame({"source": ["B", "A"], "target": ["A", "D"]}), directed=False, name="t"
    )
    metrics = AuprcEvaluator(plot=False).evaluate(context).metrics
    # thresholds: AB (tp1 fp0), CD (1,1), AC (1,2), rest {AD, BC, BD} tied (2,4)
    # AP = 1/2 * 1 + 1/2 * 2/6
    assert metrics["x/auprc"] == pytest.approx(0.5 + 0.5 * 2 / 6)
    # ROC points (0,0) (0,.5) (.25,.5) (.5,.5) (1,1): area = .5*.5 + trapezoid(.5..1 over .5) = .125+.25+.5*.5*.5
    assert metrics["x/auroc"] == pytest.approx(0.25 + 0.25 + 0.125)
    # k = 2: top-2 = AB, CD -> EP 1/2; density 2/6
    assert metrics["x/early_precision"] == pytest.approx(0.5)
    assert metrics["x/epr"] == pytest.approx(1.5)


def test_tf_restricted_universe(tmp_path):
    context, candidates = make_case(4, directed=True, n_true=40)
    tfs = ["g00", "g03", "g07", "g11"]
    tf_file = tmp_path / "tfs.txt"
    tf_file.write_text("\n".join(tfs) + "\n")
    metrics = AuprcEvaluator(tf_list=str(tf_file), plot=False).evaluate(context).metrics
    labels, values, n_true = dense_labels_scores(context, candidates, keep=lambda c: c[0] in tfs)
    assert metrics["x/n_candidates"] == len(tfs) * 24
    assert metrics["x/gt_pairs_in_universe"] == n_true
    assert metrics["x/auprc"] == pytest.approx(average_precision_score(labels, values), abs=1e-12)
    assert metrics["x/auroc"] == pytest.approx(roc_auc_score(labels, values), abs=1e-12)


def test_tf_list_csv_with_tf_column(tmp_path):
    context, candidates = make_case(5, directed=False, n_true=40)
    tf_file = tmp_path / "tfs.csv"
    tf_file.write_text("TF,Sources\ng01,x\ng02,y\n")
    metrics = AuprcEvaluator(tf_list=str(tf_file), plot=False).evaluate(context).metrics
    keep = lambda c: c[0] in ("g01", "g02") or c[1] in ("g01", "g02")  # noqa: E731
    labels, values, _ = dense_labels_scores(context, candidates, keep=keep)
    assert metrics["x/n_candidates"] == sum(1 for c in candidates if keep(c))
    assert metrics["x/auprc"] == pytest.approx(average_precision_score(labels, values), abs=1e-12)


def test_signed_edges():
    context, candidates = make_case(6, directed=True, signed=True, n_true=50, fraction_listed=0.9)
    metrics = AuprcEvaluator(signed=True, plot=False).evaluate(context).metrics
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
    assert metrics["x/n_candidates"] == len(signed)
    assert metrics["x/auprc"] == pytest.approx(average_precision_score(labels, values), abs=1e-12)
    assert metrics["x/auroc"] == pytest.approx(roc_auc_score(labels, values), abs=1e-12)
    assert metrics["x/early_precision"] == pytest.approx(early_precision_by_hand(labels, values, 50))
    unsigned = AuprcEvaluator(plot=False).evaluate(context).metrics
    assert unsigned["x/auprc"] > metrics["x/auprc"]  # wrong-sign hits stop counting


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
    assert flipped["x/auprc"] == AuprcEvaluator(plot=False).evaluate(context).metrics["x/auprc"]


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
    assert result.metrics["x/auprc"] == pytest.approx(1.0)
    assert result.metrics["x/auroc"] == pytest.approx(1.0)
    assert result.metrics["x/early_precision"] == pytest.approx(1.0)
    assert "x_pr_roc" in result.figures


def test_stability_aggregate_contract():
    evaluator = AuprcEvaluator(stability_top_k=3, plot=False)
    contexts = [make_case(10, fraction_listed=1.0)[0] for _ in range(2)]
    results = [evaluator.evaluate(c) for c in contexts]
    assert len(results[0].state["top_pairs"]["x"]) == 3
    assert not any("top_k" in k for k in results[0].metrics)  # pair identities are state, not metrics
    assert all(AuprcEvaluator.declares(k) for k in results[0].metrics)
    same = evaluator.aggregate(results, results[0])
    assert same["x/top_k_jaccard"] == 1.0 and same["x/top_k_spearman"] == pytest.approx(1.0)
    assert same["x/top_k_jaccard_reference"] == 1.0
    # hand-built lists: {p1..p5} vs {p2,p1,p3,p5,p6}: Jaccard 4/6
    a = EvaluationResult({"x/auprc": 0.2}, state={"top_pairs": {"x": ["p1", "p2", "p3", "p4", "p5"]}})
    b = EvaluationResult({"x/auprc": 0.4}, state={"top_pairs": {"x": ["p2", "p1", "p3", "p5", "p6"]}})
    out = evaluator.aggregate([a, b], None)
    assert out["x/top_k_jaccard"] == pytest.approx(4 / 6)
    # shared p1,p2,p3,p5 ranked [0,1,2,4] in a and [1,0,2,3] in b: Spearman of ranks = 1 - 6*2/(4*15) = 0.8
    assert out["x/top_k_spearman"] == pytest.approx(0.8)
    assert "x/top_k_jaccard_reference" not in out
    assert jaccard(["p1"], ["p2"]) == 0.0
    assert np.isnan(top_k_spearman(["p1", "p2", "p3"], ["p4", "p5", "p6"]))  # nothing shared


def test_top_pairs_identify_pairs_whichever_way_they_are_written():
    context, _ = make_case(11, fraction_listed=1.0)
    evaluator = AuprcEvaluator(stability_top_k=5, plot=False)
    first = evaluator.evaluate(context).state["top_pairs"]["x"]
    reversed_table = context.interactions["x"].table.copy()  # same pairs written B|A
    reversed_table[["source", "target"]] = reversed_table[["target", "source"]].to_numpy()
    context.interactions["x"] = Interactions(
        reversed_table, directed=False, extractor="x", genes=context.interactions["x"].genes
    )
    second = evaluator.evaluate(context).state["top_pairs"]["x"]
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
    metrics = AuprcEvaluator(plot=False).evaluate(context).metrics
    assert metrics["x/n_candidates"] == 6  # undirected
    # ranked unique pairs: CD, AB, AD (+3 unlisted): AP = precision at AB = 1/2
    assert metrics["x/auprc"] == pytest.approx(0.5)
    assert metrics["x/early_precision"] == 0.0  # k = 1: top-1 is CD


def test_random_baselines_and_counts_are_informational():
    """They describe the ground truth and the universe: no direction to optimise or compare."""
    result = AuprcEvaluator(plot=False).evaluate(make_case(3)[0])
    informational = {"auprc_random", "auroc_random", "early_precision_random", "epr_random", "n_candidates"}
    informational |= {"gt_edges", "gt_pairs_in_universe", "gt_genes_in_universe", "universe_genes"}
    informational |= {"gt_pairs_in_list", "gt_signed_pairs_in_universe"}
    for name in result.metrics:
        assert AuprcEvaluator.declares(name), name
        metric = name.split("/", 1)[1]
        expected = None if metric in informational else True
        assert AuprcEvaluator.metric_direction(name) is expected, name
    assert {"x/auprc_random", "x/n_candidates", "x/gt_edges"} <= set(result.metrics)
