"""AUPRC, AUROC and early precision of ranked pairs against a ground-truth network (BEELINE conventions)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from grnx_core import (
    ComponentParams,
    DataError,
    EvaluationResult,
    Evaluator,
    GroundTruth,
    Interactions,
    RunContext,
)
from grnx_plugins.evaluators import _curves, _pairs
from grnx_plugins.evaluators._pairs import OVERLAP_COUNTS, PairProblem
from grnx_plugins.evaluators.ground_truth import GroundTruthSpec, normalise_gene, resolve_ground_truth

#: Metrics also scored for a baseline extractor over the same pairs (``baseline_extractor``).
BASELINE_METRICS: tuple[str, ...] = ("auprc", "auroc", "epr")


class AuprcEvaluator(Evaluator):
    """Graph metrics of each ranked pair list over all candidate pairs of its gene universe.

    Pratapa et al. BEELINE (Nat Methods 2020, https://doi.org/10.1038/s41592-019-0690-6), as its
    code computes them (Murali-group/Beeline, BLEval/computeAUC.py ``computeScores`` and
    BLEval/computeEarlyPrec.py ``EarlyPrec``): candidates are every ordered (directed) or unordered
    (undirected) pair of distinct genes of the universe; ``universe: truth_genes`` (default) takes the
    genes the ground truth names that the extractor scored (BEELINE: the ground truth's genes),
    ``all_genes`` every gene the extractor scored. Pairs absent from the ranked list count as scored
    lowest (one tied threshold, BEELINE's weight 0). Scored directed, an undirected pair A|B predicts
    both A -> B and B -> A with its score; scored undirected, a directed list keeps the better of the
    two orientations.

    Metric keys are ``<extractor>/<universe tag>/<metric>`` (logged as
    ``eval/<evaluator id>/<extractor>/<universe tag>/<metric>``). The tag names the candidate set:
    ``truth_genes`` or ``all_genes``, then ``_tf`` when ``tf_list`` restricts it to pairs leaving a
    listed TF, ``_tfedges`` when ``tf_edges`` restricts it to pairs leaving a ground-truth source,
    then ``_signed`` when candidates are (pair, sign): e.g. ``truth_genes``,
    ``all_genes_tf_signed``, ``truth_genes_tfedges``. (Whether pairs are ordered is in the overlap
    table and the figure title: two evaluator entries with ``directed`` set apart have their ids.)

    Metrics: ``auprc`` is average precision (scikit-learn's definition), ``auprc_trapezoid`` the
    trapezoidal area BEELINE reports as AUPRC; ``auroc``; ``early_precision`` = precision of the
    top-k pairs (ties at the k-th score included; the whole list when it is shorter than k),
    k = number of true pairs in the universe; ``epr`` = early precision / edge density. Beside
    each: ``*_random``, its value for a random ranking (the edge density for the precision-based
    ones, 0.5 for AUROC, 1 for EPR), ``auprc_ratio`` / ``auprc_trapezoid_ratio`` (divided by the
    density; ``epr`` is that ratio for early precision), and ``*_best``, the best value any
    re-ranking of the extractor's own list reaches: its true pairs first, then its false pairs,
    the pairs it did not score still tied at the bottom. With h of the P true pairs among the L
    listed of N candidates, ``auprc_best`` = h/P + (P - h)/N (1 when the list covers every
    candidate) and ``early_precision_best`` = min(h, k) / min(k, L); so a truncated top-k list, or
    a universe with true pairs the extractor never scored, shows how much of the gap to 1 no
    ordering of that list could close. ``universe_genes`` counts the universe,
    ``extractor_genes`` the genes the extractor scored.

    ``baseline_extractor``: another extractor of the run (e.g. ``pearson``) scored over the same
    candidate pairs as each scored extractor: both are narrowed to the genes they share inside the
    extractor's universe, with the extractor's pair orientation, TF restriction and signs. Reported
    as ``auprc_vs_<baseline>`` (the extractor's AUPRC over the baseline's on those pairs; also
    ``auroc_vs_``, ``epr_vs_``), the baseline's value ``auprc_of_<baseline>`` (``auroc_of_``,
    ``epr_of_``) and ``genes_shared_with_<baseline>``. When the baseline scored every gene of the
    universe, the extractor's own figures are those the ratio uses. A ratio whose baseline value is
    0 (an EPR without a true pair in the top k) is NaN.

    Options: TF-restricted universe (pairs whose source, or for undirected pairs either gene, is a
    TF: from ``tf_list``, or the ground truth's source genes with ``tf_edges``, which is BEELINE's
    EPR on experimental data), signed edges (candidates are (pair, sign) combinations, twice as many
    as pairs; a listed pair predicts its own sign and is true only when that matches the ground
    truth), and top-k stability across repeats (``aggregate``: Jaccard and Spearman of the top-k pairs
    between repeats and against the reference run).

    Where BEELINE differs: it scores |EdgeWeight| (grnx ranks by ``score``, which extractors set to
    |r| with ``rank_by: abs``), rounds weights to 6 decimals and leaves weight-0 edges out of the
    top k in EPR, and keeps ground-truth genes the data lacks in the universe (grnx counts them in
    ``gt_edges`` but not in ``gt_pairs_in_universe``).
    """

    name = "auprc"
    description = (
        "AUPRC, AUROC, early precision (EPR) of ranked pairs against a ground truth, with random, "
        "best achievable and baseline-extractor values."
    )
    reference = "https://doi.org/10.1038/s41592-019-0690-6"
    needs: ClassVar[tuple[str, ...]] = ("interactions", "ground_truth")

    class Params(ComponentParams):
        ground_truth: GroundTruthSpec = Field(
            default_factory=GroundTruthSpec,
            description="reference network: {source: data[, edges: <name>]} or {source: file, ...}",
        )
        extractors: list[str] | None = Field(None, description="extractor ids to score; all when None")
        directed: Literal["auto", "directed", "undirected"] = Field(
            "auto",
            description="auto: directed only when both the ground truth and the interactions are "
            "directed; directed: ordered pairs (an undirected pair predicts both orientations); "
            "undirected: unordered pairs (a directed list keeps the better orientation)",
        )
        universe: Literal["truth_genes", "all_genes"] = Field(
            "truth_genes",
            description="candidate pairs are those of truth_genes: the ground truth's genes the "
            "extractor scored (BEELINE), or all_genes: every gene the extractor scored",
        )
        tf_list: str | None = Field(
            None,
            description="TF list file (one per line, or a CSV with a TF column): restrict candidates "
            "to pairs whose source is a TF, e.g. ../shared/data/ground_truth/tf_lists/human-tfs.csv",
        )
        tf_edges: bool = Field(
            False,
            description="restrict candidates to pairs whose source is a source gene of the ground "
            "truth (BEELINE's TFEdges, its EPR on experimental data); not with tf_list",
        )
        signed: bool = Field(
            False,
            description="candidates are (pair, sign): a listed pair is true only with the ground-truth "
            "sign; edges of unknown sign are left out",
        )
        baseline_extractor: str | None = Field(
            None,
            description="id of another extractor of the run (e.g. pearson) scored over the same pairs "
            "as each scored extractor: <metric>_vs_<id> (ratio) and <metric>_of_<id> (its value)",
        )
        stability_top_k: int | None = Field(
            None,
            ge=1,
            description="keep the top k pairs of each repeat so aggregate() can measure their stability "
            "across repeats (Jaccard, Spearman)",
        )
        plot: bool = Field(True, description="draw PR and ROC curves per extractor")

        @model_validator(mode="after")
        def _one_source_of_tfs(self) -> AuprcEvaluator.Params:
            if self.tf_edges and self.tf_list is not None:
                raise ValueError(
                    "tf_edges takes the TFs from the ground truth and tf_list from a file; set one of them"
                )
            return self

    higher_is_better: ClassVar[dict[str, bool]] = {
        "auprc": True,
        "auprc_ratio": True,
        "auprc_trapezoid": True,
        "auprc_trapezoid_ratio": True,
        "auroc": True,
        "early_precision": True,
        "epr": True,
        # baseline_extractor: the baseline id replaces <baseline> (see _declaration)
        **{f"{metric}_vs_<baseline>": True for metric in BASELINE_METRICS},
        # aggregate() over repeats
        "top_k_jaccard": True,
        "top_k_spearman": True,
        "top_k_jaccard_reference": True,
        "top_k_spearman_reference": True,
    }
    #: random baselines, best achievable values, the baseline extractor's values and counts: no
    #: direction (they describe the universe and the list, not how well this extractor ranks it)
    informational: ClassVar[frozenset[str]] = frozenset(
        {
            "auprc_random",
            "auprc_trapezoid_random",
            "auroc_random",
            "early_precision_random",
            "epr_random",
            "auprc_best",
            "auprc_trapezoid_best",
            "auroc_best",
            "early_precision_best",
            "epr_best",
            "n_candidates",
            "extractor_genes",
            "genes_shared_with_<baseline>",
            *(f"{metric}_of_<baseline>" for metric in BASELINE_METRICS),
        }
        | OVERLAP_COUNTS
    )

    @classmethod
    def _declaration(cls, metric: str) -> str | None:
        """Baseline metrics carry the baseline's id in their last part (``auprc_vs_pearson``): they
        match the ``<baseline>`` entries; everything else is matched as for any evaluator."""
        leaf = metric.rsplit("/", 1)[-1]
        patterns = [f"{m}_vs_" for m in BASELINE_METRICS] + [f"{m}_of_" for m in BASELINE_METRICS]
        patterns.append("genes_shared_with_")
        for prefix in patterns:
            if leaf.startswith(prefix) and len(leaf) > len(prefix):
                return f"{prefix}<baseline>"
        return super()._declaration(metric)

    @property
    def universe_tag(self) -> str:
        """The candidate set in metric keys: see the class docstring."""
        tag = self.universe
        if self.tf_list is not None:
            tag += "_tf"
        if self.tf_edges:
            tag += "_tfedges"
        return tag + ("_signed" if self.signed else "")

    def evaluate(self, context: RunContext) -> EvaluationResult:
        from grnx_plugins.evaluators._plots import pr_roc_plot

        who = f"evaluator {self.name!r}"
        selected = _pairs.select_interactions(context, self.extractors, who)
        baseline = self._baseline(context, who)
        truth = resolve_ground_truth(self.ground_truth, context, who)
        case_sensitive = self.ground_truth.case_sensitive
        tf_genes = read_tf_list(self.tf_list, case_sensitive, who) if self.tf_list else None
        if self.tf_edges:
            tf_genes = truth_sources(truth, case_sensitive, who)
        tag = self.universe_tag
        metrics: dict[str, float] = {}
        figures = {}
        problems = {}
        top_pairs: dict[str, list[str]] = {}
        for extractor, interactions in selected.items():
            raw = _pairs.prepare(
                interactions,
                truth,
                extractor=extractor,
                who=who,
                mode=self.directed,
                universe=self.universe,
                case_sensitive=case_sensitive,
                tf_genes=tf_genes,
            )
            problems[extractor] = raw
            problem = self._scored_view(raw, who)
            scores = score_problem(problem, self.signed)
            values = {
                **scores.metrics(),
                "n_candidates": float(problem.n_candidates),
                "extractor_genes": float(problem.n_extractor_genes),
                **problem.report,
            }
            if baseline is not None and baseline != extractor:
                values.update(
                    self._against_baseline(
                        context, extractor, interactions, raw, scores, baseline, truth, tf_genes, who
                    )
                )
            if self.stability_top_k is not None:
                top_pairs[f"{extractor}/{tag}"] = [
                    str(p) for p in problem.decode(problem.codes[: self.stability_top_k])
                ]
            metrics.update({f"{extractor}/{tag}/{key}": float(value) for key, value in values.items()})
            if self.plot:
                recall, precision = scores.curve.pr_curve()
                fpr, tpr = scores.curve.roc_curve()
                figures[f"{extractor}_pr_roc"] = pr_roc_plot(
                    recall,
                    precision,
                    fpr,
                    tpr,
                    scores.density,
                    title=f"{extractor} vs {truth.name} ({'directed' if problem.directed else 'undirected'}, "
                    f"{problem.universe_description}): AUPRC {values['auprc']:.3g} (random "
                    f"{scores.density:.3g}, best {values['auprc_best']:.3g}), AUROC {values['auroc']:.3f}, "
                    f"EPR {values['epr']:.2f}",
                )
        overlap = _pairs.overlap_table(problems, truth)
        overlap.insert(overlap.columns.get_loc("universe") + 1, "universe_tag", tag)
        return EvaluationResult(
            metrics=metrics,
            figures=figures,
            tables={"ground_truth_overlap": overlap},
            state={"top_pairs": top_pairs},
        )

    def _baseline(self, context: RunContext, who: str) -> str | None:
        baseline = self.baseline_extractor
        if baseline is not None and baseline not in context.interactions:
            raise DataError(
                f"{who}: baseline_extractor is {baseline!r}, which is not an extractor of this run "
                f"(extractor ids: {sorted(context.interactions)}). Add it to the recipe's extractors "
                "(e.g. {name: pearson, id: pearson, params: {rank_by: abs}}) or name one of those ids."
            )
        return baseline

    def _scored_view(self, problem: PairProblem, who: str) -> PairProblem:
        """The problem as scored: (pair, sign) candidates when signed; refuses a universe in which
        every candidate is true (no ranking could be better than another)."""
        if self.signed:
            problem = problem.signed_view()
            if len(problem.truth_codes) == 0:
                raise DataError(
                    f"{who}: signed: true, but no ground-truth pair in the universe has a known sign."
                )
        n_true = len(problem.truth_codes)
        if n_true == problem.n_candidates:
            raise DataError(
                f"{who}: every one of the {n_true} candidate pairs of {problem.extractor!r} "
                f"({problem.universe_description}) is a ground-truth pair, so no ranking can be "
                "better or worse than another. Use universe: all_genes, or a sparser ground truth."
            )
        return problem

    def _against_baseline(
        self,
        context: RunContext,
        extractor: str,
        interactions: Interactions,
        problem: PairProblem,
        scores: PairScores,
        baseline: str,
        truth: GroundTruth,
        tf_genes: set[str] | None,
        who: str,
    ) -> dict[str, float]:
        """The baseline extractor and this one over the candidate pairs of the genes they share."""
        case_sensitive = self.ground_truth.case_sensitive
        baseline_interactions = context.interactions[baseline]
        own_genes = {normalise_gene(g, case_sensitive) for g in problem.genes}
        shared = own_genes & {normalise_gene(str(g), case_sensitive) for g in baseline_interactions.genes}
        where = f"{who}: baseline_extractor {baseline!r} against {extractor!r}"
        if len(shared) < 2:
            raise DataError(
                f"{where}: the baseline scored {len(shared)} of the {len(own_genes)} genes of "
                f"{extractor!r}'s universe ({problem.universe_description}), so they share no pair. "
                "Use a baseline over the same genes (e.g. pearson on the same data)."
            )
        same_pairs = {
            "truth": truth,
            "who": where,
            "mode": "directed" if problem.directed else "undirected",
            "universe": self.universe,
            "case_sensitive": case_sensitive,
            "tf_genes": tf_genes,
            "only_genes": shared,
        }
        if len(shared) < len(own_genes):  # narrowed: score this extractor again over the shared pairs
            own = self._scored_view(_pairs.prepare(interactions, extractor=extractor, **same_pairs), where)
            scores = score_problem(own, self.signed)
        base = self._scored_view(
            _pairs.prepare(baseline_interactions, extractor=baseline, **same_pairs), where
        )
        base_scores = score_problem(base, self.signed)
        if base_scores.n_candidates != scores.n_candidates or base_scores.n_true != scores.n_true:
            raise AssertionError(  # the narrowing above guarantees the same candidates
                f"{where}: {base_scores.n_candidates} candidates ({base_scores.n_true} true) for the "
                f"baseline, {scores.n_candidates} ({scores.n_true} true) for the extractor"
            )
        own_values, base_values = scores.metrics(), base_scores.metrics()
        out = {f"genes_shared_with_{baseline}": float(len(shared))}
        for metric in BASELINE_METRICS:
            out[f"{metric}_of_{baseline}"] = base_values[metric]
            denominator = base_values[metric]
            out[f"{metric}_vs_{baseline}"] = (
                own_values[metric] / denominator if denominator > 0 else float("nan")
            )
        return out

    def aggregate(
        self, repeat_results: list[EvaluationResult], reference: EvaluationResult | None
    ) -> dict[str, float]:
        """Top-k stability across repeats, when ``stability_top_k`` made the repeats report their top pairs.

        (The runner already logs the mean and standard deviation of every metric over repeats.)

        ``top_k_jaccard`` / ``top_k_spearman``: mean over pairs of repeats; ``*_reference``: mean over
        repeats against the reference (full-data) run when given. Spearman compares the ranks of the
        pairs two lists share (NaN when fewer than 3 are shared).
        """
        out: dict[str, float] = {}
        if not repeat_results:
            return out
        # state keys are "<extractor>/<universe tag>", so the metrics below name the universe too
        extractors = {name for result in repeat_results for name in result.state.get("top_pairs", {})}
        for extractor in sorted(extractors):
            lists = [top_pairs(result, extractor) for result in repeat_results]
            if all(len(lst) for lst in lists) and len(lists) > 1:
                pairs = list(combinations(lists, 2))
                out[f"{extractor}/top_k_jaccard"] = float(np.mean([jaccard(a, b) for a, b in pairs]))
                out[f"{extractor}/top_k_spearman"] = float(
                    np.nanmean([top_k_spearman(a, b) for a, b in pairs])
                )
            reference_pairs = top_pairs(reference, extractor) if reference is not None else []
            if len(reference_pairs) and all(len(lst) for lst in lists):
                out[f"{extractor}/top_k_jaccard_reference"] = float(
                    np.mean([jaccard(a, reference_pairs) for a in lists])
                )
                out[f"{extractor}/top_k_spearman_reference"] = float(
                    np.nanmean([top_k_spearman(a, reference_pairs) for a in lists])
                )
        return out


def top_pairs(result: EvaluationResult, extractor: str) -> list[str]:
    """The ranked top-k pair ids ("A|B") an ``evaluate`` call kept for ``extractor`` (its
    "<extractor id>/<universe tag>" key)."""
    return list(result.state.get("top_pairs", {}).get(extractor, []))


def jaccard(a: list[str], b: list[str]) -> float:
    first, second = set(a), set(b)
    union = first | second
    return len(first & second) / len(union) if union else 1.0


def top_k_spearman(a: list[str], b: list[str]) -> float:
    """Spearman correlation of the ranks of the pairs both top-k lists share (NaN below 3 shared).

    Ranking missing pairs last would make two disjoint lists look anti-correlated; the overlap
    itself is what ``jaccard`` measures.
    """
    from scipy.stats import spearmanr

    rank_b = {item: r for r, item in enumerate(b)}
    shared = [(r, rank_b[item]) for r, item in enumerate(a) if item in rank_b]
    if len(shared) < 3:
        return float("nan")
    x, y = zip(*shared)
    return float(spearmanr(x, y).statistic)


@dataclass
class PairScores:
    """The curves and early precision of one scored problem, and those of its best re-ranking."""

    curve: _curves.Curves
    best_curve: _curves.Curves
    early_precision: float
    best_early_precision: float
    n_true: int
    n_candidates: int

    @property
    def density(self) -> float:
        return self.n_true / self.n_candidates

    def metrics(self) -> dict[str, float]:
        density = self.density
        auprc, trapezoid = self.curve.average_precision(), self.curve.auprc_trapezoid()
        return {
            "auprc": auprc,
            "auprc_random": density,
            "auprc_ratio": auprc / density,
            "auprc_best": self.best_curve.average_precision(),
            "auprc_trapezoid": trapezoid,
            "auprc_trapezoid_random": density,
            "auprc_trapezoid_ratio": trapezoid / density,
            "auprc_trapezoid_best": self.best_curve.auprc_trapezoid(),
            "auroc": self.curve.auroc(),
            "auroc_random": 0.5,
            "auroc_best": self.best_curve.auroc(),
            "early_precision": self.early_precision,
            "early_precision_random": density,
            "early_precision_best": self.best_early_precision,
            "epr": self.early_precision / density,
            "epr_random": 1.0,
            "epr_best": self.best_early_precision / density,
        }


def score_problem(problem: PairProblem, signed: bool) -> PairScores:
    """Curves of the ranked list over the problem's candidates, and of the list re-ranked with its
    true pairs first (the best achievable: see ``AuprcEvaluator``)."""
    labels = problem.labels(signed=signed)
    n_true, n_candidates = len(problem.truth_codes), problem.n_candidates
    best_labels, best_scores = _curves.best_ranking(labels)
    return PairScores(
        curve=_curves.curves(labels, problem.scores, n_true, n_candidates),
        best_curve=_curves.curves(best_labels, best_scores, n_true, n_candidates),
        early_precision=_curves.early_precision(labels, problem.scores, n_true),
        best_early_precision=_curves.early_precision(best_labels, best_scores, n_true),
        n_true=n_true,
        n_candidates=n_candidates,
    )


def truth_sources(truth: GroundTruth, case_sensitive: bool, who: str) -> set[str]:
    """The regulators of a directed ground truth: its source genes (BEELINE's TFs with TFEdges)."""
    if not truth.directed:
        raise DataError(
            f"{who}: tf_edges takes the TFs from the sources of the ground truth, but {truth.name!r} is "
            "undirected, so its pairs have no source. Give the TFs in tf_list instead."
        )
    return {normalise_gene(str(g), case_sensitive) for g in truth.edges["source"]}


def read_tf_list(path: str, case_sensitive: bool, who: str) -> set[str]:
    """TF names from a one-per-line list, or a CSV/TSV whose first column (or 'TF' column) holds them."""
    from grnx_plugins.data._common import first_lines
    from grnx_plugins.evaluators.ground_truth import _read_table

    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{who}: tf_list {path!r} not found (resolved to {file.resolve()}).")
    suffixes = [s.lower() for s in file.suffixes if s.lower() not in (".gz", ".bz2", ".xz", ".zip")]
    if suffixes and suffixes[-1] in (".csv", ".tsv"):
        table = _read_table(file, who=who, what="a TF list")
        column = "TF" if "TF" in table.columns else table.columns[0]
        names = table[column].dropna().tolist()
    else:
        names = [line.strip() for line in first_lines(file, None)]
        names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise DataError(f"{who}: tf_list {path!r} holds no names.")
    return {normalise_gene(n, case_sensitive) for n in names}
