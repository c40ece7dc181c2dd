"""Ranked pair lists and ground-truth pair sets as integer codes over one gene universe.

A pair (i, j) of universe genes is the integer ``i * n_genes + j`` (``i < j`` when undirected), so
membership tests, de-duplication and ranking work on int64 arrays instead of millions of "A|B"
strings. Shared by the interaction evaluators (nes, nes_stability, auprc).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from grnx_core import DataError, GroundTruth, Interactions, RunContext
from grnx_plugins.evaluators.ground_truth import normalise_gene, overlap_error

DirectedMode = Literal["auto", "directed", "undirected"]
#: Which genes' pairs are the candidates: see ``prepare``.
Universe = Literal["truth_genes", "all_genes"]


#: The overlap counts every pair evaluator reports with its scores (``report``): informational,
#: they describe the ground truth and the universe, not how good the ranking is.
OVERLAP_COUNTS: frozenset[str] = frozenset(
    {
        "gt_edges",
        "gt_pairs_in_universe",
        "gt_genes_in_universe",
        "universe_genes",
        "gt_pairs_in_list",
        "gt_signed_pairs_in_universe",
    }
)


@dataclass
class PairProblem:
    """One extractor's ranked list against the ground truth, inside the extractor's gene universe."""

    extractor: str
    directed: bool
    genes: list[str]
    codes: np.ndarray  # int64, ranked order, unique
    scores: np.ndarray  # float64, descending
    signs: np.ndarray | None  # int8 predicted signs, or None
    truth_codes: np.ndarray  # sorted unique int64
    truth_signs: np.ndarray | None  # int8 aligned with truth_codes, or None
    n_candidates: int
    #: ``all_genes`` or ``truth_genes`` (see ``prepare``), and how many genes the extractor scored
    universe: Universe = "all_genes"
    n_extractor_genes: int = 0
    report: dict[str, float] = field(default_factory=dict)

    @property
    def universe_description(self) -> str:
        """The gene set the candidate pairs are drawn from, in words, e.g. for tables and titles."""
        if self.universe == "truth_genes":
            return (
                f"ground-truth genes scored by {self.extractor} ({self.n_genes} of "
                f"{self.n_extractor_genes} genes)"
            )
        return f"all genes scored by {self.extractor} ({self.n_genes} genes)"

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def labels(self, signed: bool = False) -> np.ndarray:
        """True where the ranked pair is a ground-truth pair (with the right sign when ``signed``)."""
        where = np.searchsorted(self.truth_codes, self.codes)
        where = np.minimum(where, len(self.truth_codes) - 1)
        hit = self.truth_codes[where] == self.codes
        if signed:
            if self.signs is None or self.truth_signs is None:
                raise DataError(
                    f"signed evaluation of {self.extractor!r} needs signs on both sides: the interactions "
                    f"{'have' if self.signs is not None else 'lack'} a 'sign' column and the ground truth "
                    f"{'has' if self.truth_signs is not None else 'lacks'} one. Use rank_by: abs in the "
                    "extractor and a signed ground truth (trrust, dorothea, regnetwork, beeline Type), or "
                    "set signed: false."
                )
            hit &= self.truth_signs[where] == self.signs
        return hit

    def signed_view(self) -> PairProblem:
        """Candidates become (pair, sign) combinations: 2 per pair; a listed pair predicts one of them.

        Ground-truth edges of unknown sign (0) cannot be matched and are left out.
        """
        self.labels(signed=True)  # raises the clear error when a side has no signs
        known = self.truth_signs != 0
        return PairProblem(
            extractor=self.extractor,
            directed=self.directed,
            genes=self.genes,
            codes=self.codes,
            scores=self.scores,
            signs=self.signs,
            truth_codes=self.truth_codes[known],
            truth_signs=self.truth_signs[known],
            n_candidates=2 * self.n_candidates,
            universe=self.universe,
            n_extractor_genes=self.n_extractor_genes,
            report={**self.report, "gt_signed_pairs_in_universe": float(known.sum())},
        )

    def decode(self, codes: np.ndarray) -> np.ndarray:
        names = np.asarray(self.genes, dtype=object)
        first, second = np.divmod(np.asarray(codes, dtype=np.int64), self.n_genes)
        return names[first] + "|" + names[second]


def select_interactions(
    context: RunContext, extractors: list[str] | None, who: str
) -> dict[str, Interactions]:
    """The interactions to score: those named in ``extractors``, or all of them."""
    available = context.interactions
    if not available:
        raise DataError(
            f"{who} scores ranked gene pairs, but the run produced none. Add an extractor to the recipe "
            "(e.g. extractors: [{name: pearson}])."
        )
    if extractors is None:
        return dict(available)
    unknown = [e for e in extractors if e not in available]
    if unknown:
        raise DataError(
            f"{who}: params.extractors names {unknown}, which the run does not have. "
            f"Extractor ids in this run: {sorted(available)}."
        )
    return {e: available[e] for e in extractors}


def evaluation_directed(mode: DirectedMode, truth: GroundTruth, interactions: Interactions) -> bool:
    """auto: directed only when both the ground truth and the predictions are (BEELINE convention)."""
    if mode == "auto":
        return bool(truth.directed and interactions.directed)
    return mode == "directed"


def _pair_codes(first: np.ndarray, second: np.ndarray, n_genes: int, directed: bool) -> np.ndarray:
    first = first.astype(np.int64)
    second = second.astype(np.int64)
    if not directed:
        first, second = np.minimum(first, second), np.maximum(first, second)
    return first * n_genes + second


def _column_indices(column: pd.Series, index: pd.Index) -> np.ndarray:
    codes, uniques = pd.factorize(column, sort=False)
    mapped = index.get_indexer(pd.Index(uniques).astype(str))
    out = np.full(len(codes), -1, dtype=np.int64)
    valid = codes >= 0
    out[valid] = mapped[codes[valid]]
    return out


def prepare(
    interactions: Interactions,
    truth: GroundTruth,
    *,
    extractor: str,
    who: str,
    mode: DirectedMode = "auto",
    universe: Universe = "all_genes",
    case_sensitive: bool = True,
    tf_genes: set[str] | None = None,
    top_n: int | None = None,
    only_genes: set[str] | None = None,
) -> PairProblem:
    """Encode the ranked list and the ground truth of one extractor as pair codes in a gene universe.

    ``universe``: ``all_genes``, every gene the extractor scored (``interactions.genes``);
    ``truth_genes``, those of them the ground truth names (BEELINE's candidates are the pairs of
    the ground truth's genes: ``computeScores`` in BLEval/computeAUC.py, Murali-group/Beeline).
    Scored directed, an undirected prediction A|B predicts both A -> B and B -> A with its score
    (BEELINE's Pearson runner writes both orientations), so the figures do not depend on the
    order the genes were stored in. Scored undirected, a directed list keeps the better-ranked of
    A -> B and B -> A (BEELINE's undirected mode takes the larger weight of the two).
    ``only_genes`` (normalised names) narrows the genes the extractor scored to those, before the
    universe is drawn: two extractors narrowed to one shared gene set have the same candidates.
    """
    directed = evaluation_directed(mode, truth, interactions)
    all_genes = [str(g) for g in interactions.genes]
    scored = all_genes
    if only_genes is not None:
        scored = [g for g in all_genes if normalise_gene(g, case_sensitive) in only_genes]

    # Ground truth: match on normalised names (Ensembl versions dropped, optional case folding).
    keys: dict[str, int] = {}
    for position, gene in enumerate(scored):
        keys.setdefault(normalise_gene(gene, case_sensitive), position)
    edges = truth.edges
    gt_source = _mapped(edges["source"], keys, case_sensitive)
    gt_target = _mapped(edges["target"], keys, case_sensitive)
    if universe == "truth_genes":
        named = np.union1d(gt_source[gt_source >= 0], gt_target[gt_target >= 0])
        renumber = np.full(len(scored), -1, dtype=np.int64)
        renumber[named] = np.arange(len(named))
        gt_source = np.where(gt_source >= 0, renumber[gt_source], -1)
        gt_target = np.where(gt_target >= 0, renumber[gt_target], -1)
        genes = [scored[i] for i in named]
    else:
        genes = scored
    n_genes = len(genes)
    inside = (gt_source >= 0) & (gt_target >= 0) & (gt_source != gt_target)
    truth_signs = edges["sign"].to_numpy(dtype=np.int8)[inside] if "sign" in edges.columns else None
    gt_source, gt_target = gt_source[inside], gt_target[inside]
    if directed and not truth.directed:
        gt_source, gt_target = np.r_[gt_source, gt_target], np.r_[gt_target, gt_source]
        truth_signs = np.r_[truth_signs, truth_signs] if truth_signs is not None else None
    truth_codes = _pair_codes(gt_source, gt_target, n_genes, directed)

    # The ranked list, inside the universe.
    index = pd.Index(genes)
    table = interactions.table
    scores = table["score"].to_numpy(dtype=np.float64)
    source = _column_indices(table["source"], index)
    target = _column_indices(table["target"], index)
    signs = table["sign"].to_numpy(dtype=np.int8) if "sign" in table.columns else None
    keep = (source >= 0) & (target >= 0) & (source != target) & ~np.isnan(scores)
    if not keep.all():
        source, target, scores = source[keep], target[keep], scores[keep]
        signs = signs[keep] if signs is not None else None
    if directed and not interactions.directed:
        # Each pair followed by its reverse, at the same score: the ranking is unchanged.
        source, target = np.column_stack([source, target]).ravel(), np.column_stack([target, source]).ravel()
        scores = np.repeat(scores, 2)
        signs = np.repeat(signs, 2) if signs is not None else None
    codes = _pair_codes(source, target, n_genes, directed)
    # A pair listed twice (A -> B and B -> A scored undirected, or a repeated row): keep the
    # better-ranked copy, as BEELINE keeps the first row of a repeated edge.
    _, first = np.unique(codes, return_index=True)
    if len(first) < len(codes):
        first.sort()
        codes, scores, source, target = codes[first], scores[first], source[first], target[first]
        signs = signs[first] if signs is not None else None

    n_candidates = n_genes * (n_genes - 1) if directed else n_genes * (n_genes - 1) // 2
    if tf_genes is not None:
        tf_mask = np.array([normalise_gene(g, case_sensitive) in tf_genes for g in genes], dtype=bool)
        n_tf = int(tf_mask.sum())
        if n_tf == 0:
            raise DataError(
                f"{who}: none of the {n_genes} genes of the universe of {extractor!r} ({universe}) is in "
                f"the TF list (e.g. genes {genes[:4]}). Check tf_list and gene naming (case_sensitive)."
            )
        if directed:
            n_candidates = n_tf * (n_genes - 1)
            keep_list, keep_truth = tf_mask[source], tf_mask[gt_source]
        else:
            n_other = n_genes - n_tf
            n_candidates -= n_other * (n_other - 1) // 2
            keep_list = tf_mask[source] | tf_mask[target]
            keep_truth = tf_mask[gt_source] | tf_mask[gt_target]
        codes, scores = codes[keep_list], scores[keep_list]
        signs = signs[keep_list] if signs is not None else None
        truth_codes = truth_codes[keep_truth]
        truth_signs = truth_signs[keep_truth] if truth_signs is not None else None

    truth_codes, first = np.unique(truth_codes, return_index=True)
    truth_signs = truth_signs[first] if truth_signs is not None else None
    if top_n is not None:
        codes, scores = codes[:top_n], scores[:top_n]
        signs = signs[:top_n] if signs is not None else None

    if len(truth_codes) == 0:
        raise overlap_error(who, truth, scored, extractor)
    truth_genes_in = np.union1d(truth_codes // n_genes, truth_codes % n_genes)
    problem = PairProblem(
        extractor=extractor,
        directed=directed,
        genes=genes,
        codes=codes,
        scores=scores,
        signs=signs,
        truth_codes=truth_codes,
        truth_signs=truth_signs,
        n_candidates=int(n_candidates),
        universe=universe,
        n_extractor_genes=len(all_genes),
    )
    problem.report = {
        "gt_edges": float(len(truth.edges)),
        "gt_pairs_in_universe": float(len(truth_codes)),
        "gt_genes_in_universe": float(len(truth_genes_in)),
        "universe_genes": float(n_genes),
        "gt_pairs_in_list": float(problem.labels().sum()) if len(codes) else 0.0,
    }
    return problem


def _mapped(column: pd.Series, keys: dict[str, int], case_sensitive: bool) -> np.ndarray:
    codes, uniques = pd.factorize(column.astype(str), sort=False)
    mapped = np.array([keys.get(normalise_gene(u, case_sensitive), -1) for u in uniques], dtype=np.int64)
    return mapped[codes] if len(mapped) else np.zeros(len(codes), dtype=np.int64) - 1


def overlap_table(problems: dict[str, PairProblem], truth: GroundTruth) -> pd.DataFrame:
    """One row per extractor: how much of the ground truth the run's gene universe covers."""
    rows = []
    for extractor, problem in problems.items():
        rows.append(
            {
                "extractor": extractor,
                "ground_truth": truth.name,
                "directed": problem.directed,
                "universe": problem.universe,
                "universe_description": problem.universe_description,
                **{k: int(v) for k, v in problem.report.items()},
            }
        )
    return pd.DataFrame(rows)
