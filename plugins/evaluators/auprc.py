"""AUPRC, AUROC and early precision of ranked pairs against a ground-truth network (BEELINE conventions)."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from grnx_core import ComponentParams, DataError, EvaluationResult, Evaluator, GroundTruth, RunContext
from grnx_plugins.evaluators._pairs import OVERLAP_COUNTS
from grnx_plugins.evaluators.ground_truth import GroundTruthSpec, normalise_gene, resolve_ground_truth


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
    two orientations. ``auprc`` is average precision (scikit-learn's definition),
    ``auprc_trapezoid`` the trapezoidal area BEELINE reports as AUPRC; ``auroc``;
    ``early_precision`` = precision of the top-k pairs (ties at the k-th score included), k = number of
    true pairs in the universe; ``epr`` = early precision / edge density (a ratio already). Each has
    its random baseline (``*_random``) and ``auprc_ratio`` / ``auprc_trapezoid_ratio`` divide by it.
    ``universe_genes`` counts the universe, ``extractor_genes`` the genes the extractor scored.

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
        "AUPRC, AUROC, early precision (EPR) of ranked pairs against a ground truth, with baselines."
    )
    reference = "https://doi.org/10.1038/s41592-019-0690-6"
    needs: ClassVar[tuple[str, ...]] = ("interactions", "ground_truth")

    class Params(ComponentParams):
        ground_truth: GroundTruthSpec = Field(
            default_factory=GroundTruthSpec,
            description="reference network: {source: data} or {source: file, ...}",
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
        # aggregate() over repeats
        "top_k_jaccard": True,
        "top_k_spearman": True,
        "top_k_jaccard_reference": True,
        "top_k_spearman_reference": True,
    }
    #: random baselines and counts: no direction
    informational: ClassVar[frozenset[str]] = frozenset(
        {
            "auprc_random",
            "auroc_random",
            "early_precision_random",
            "epr_random",
            "n_candidates",
            "extractor_genes",
        }
        | OVERLAP_COUNTS
    )

    def evaluate(self, context: RunContext) -> EvaluationResult:
        from grnx_plugins.evaluators import _curves, _pairs
        from grnx_plugins.evaluators._plots import pr_roc_plot

        who = f"evaluator {self.name!r}"
        selected = _pairs.select_interactions(context, self.extractors, who)
        truth = resolve_ground_truth(self.ground_truth, context, who)
        case_sensitive = self.ground_truth.case_sensitive
        tf_genes = read_tf_list(self.tf_list, case_sensitive, who) if self.tf_list else None
        if self.tf_edges:
            tf_genes = truth_sources(truth, case_sensitive, who)
        metrics: dict[str, float] = {}
        figures = {}
        problems = {}
        top_pairs: dict[str, list[str]] = {}
        for extractor, interactions in selected.items():
            problem = _pairs.prepare(
                interactions,
                truth,
                extractor=extractor,
                who=who,
                mode=self.directed,
                universe=self.universe,
                case_sensitive=case_sensitive,
                tf_genes=tf_genes,
            )
            problems[extractor] = problem
            if self.signed:
                problem = problem.signed_view()
                if len(problem.truth_codes) == 0:
                    raise DataError(
                        f"{who}: signed: true, but no ground-truth pair in the universe has a known sign."
                    )
            labels = problem.labels(signed=self.signed)
            n_true = len(problem.truth_codes)
            if n_true == problem.n_candidates:
                raise DataError(
                    f"{who}: every one of the {n_true} candidate pairs of {extractor!r} "
                    f"({problem.universe_description}) is a ground-truth pair, so no ranking can be "
                    "better or worse than another. Use universe: all_genes, or a sparser ground truth."
                )
            density = n_true / problem.n_candidates
            curve = _curves.curves(labels, problem.scores, n_true, problem.n_candidates)
            auprc = curve.average_precision()
            ep = _curves.early_precision(labels, problem.scores, n_true)
            values = {
                "auprc": auprc,
                "auprc_random": density,
                "auprc_ratio": auprc / density,
                "auprc_trapezoid": curve.auprc_trapezoid(),
                "auprc_trapezoid_ratio": curve.auprc_trapezoid() / density,
                "auroc": curve.auroc(),
                "auroc_random": 0.5,
                "early_precision": ep,
                "early_precision_random": density,
                "epr": ep / density,
                "epr_random": 1.0,
                "n_candidates": float(problem.n_candidates),
                "extractor_genes": float(problem.n_extractor_genes),
                **problem.report,
            }
            if self.stability_top_k is not None:
                top_pairs[extractor] = [str(p) for p in problem.decode(problem.codes[: self.stability_top_k])]
            metrics.update({f"{extractor}/{key}": float(value) for key, value in values.items()})
            if self.plot:
                recall, precision = curve.pr_curve()
                fpr, tpr = curve.roc_curve()
                figures[f"{extractor}_pr_roc"] = pr_roc_plot(
                    recall,
                    precision,
                    fpr,
                    tpr,
                    density,
                    title=f"{extractor} vs {truth.name} ({'directed' if problem.directed else 'undirected'}, "
                    f"{problem.universe_description}): AUPRC {auprc:.3g} (random {density:.3g}), "
                    f"AUROC {values['auroc']:.3f}, EPR {values['epr']:.2f}",
                )
        return EvaluationResult(
            metrics=metrics,
            figures=figures,
            tables={"ground_truth_overlap": _pairs.overlap_table(problems, truth)},
            state={"top_pairs": top_pairs},
        )

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
    """The ranked top-k pair ids ("A|B") an ``evaluate`` call kept for ``extractor``."""
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
