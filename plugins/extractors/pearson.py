"""Pearson co-expression over all cells, the case cells, or its case - control difference; optionally cell-weighted."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import Field, model_validator

from grnx_core import DataError, Extractor, Interactions, RunContext
from grnx_plugins.extractors._groups import case_control_masks, case_mask
from grnx_plugins.extractors._universe import UniverseParams, universe_file, universe_indices, universe_name

#: rows read at a time when the universe is chosen on every cell (backed data stays on disk)
_MEAN_CHUNK_CELLS = 20_000


def checked_weights(weights: np.ndarray, where: str, cells: pd.Index | None = None) -> np.ndarray:
    """Per-cell weights as float64, refused when NaN, infinite, negative or all zero.

    Zero weights are allowed for some cells (they drop out); a weighted correlation with no
    positive weight, or with weights that are not numbers, would be meaningless.
    """
    weights = np.asarray(weights, dtype=np.float64).ravel()
    bad = ~np.isfinite(weights) | (weights < 0)
    if bad.any():
        rows = np.flatnonzero(bad)[:3]
        named = cells[rows] if cells is not None else rows
        examples = ", ".join(
            f"{name!s}: {float(weights[row])!r}" for name, row in zip(named, rows, strict=True)
        )
        raise DataError(
            f"{where}: {int(bad.sum())} of the {len(weights)} cell weights are NaN, infinite or negative "
            f"({examples}); weights must be finite and >= 0. Check the sampler that made them (e.g. the "
            "WDS temperature), or set params.weighting: uniform."
        )
    if not np.any(weights > 0):
        raise DataError(
            f"{where}: all {len(weights)} cell weights are 0, so no cell would count. Check the sampler "
            "that made them, or set params.weighting: uniform."
        )
    return weights


def correlation_matrix(
    matrix: np.ndarray | sp.spmatrix,
    where: str = "Pearson correlation",
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Pearson correlation between the columns of a cells x genes matrix, in float64.

    With ``weights`` (one per row, >= 0) the correlation is weighted: normalised weights
    ``p = w / sum(w)``, weighted means ``m = p^T X``, weighted covariance
    ``C = X^T diag(p) X - m m^T`` (the biased, 1/N-style estimator), and ``C_ij / sqrt(C_ii C_jj)``.
    The unbiased estimators differ from ``C`` by one scalar: ``np.cov(aweights=w)`` (reliability
    weights, ddof=1) is ``C / (1 - sum(p^2))``, ``np.cov(fweights=w)`` (frequency weights) is
    ``C * sum(w) / (sum(w) - 1)``. A scalar cancels in the correlation, so the result equals the
    correlation of ``np.cov(..., aweights=w)`` and, for integer weights, the plain correlation of
    the matrix with each row repeated ``w`` times, without dividing by ``1 - sum(p^2)``, which
    vanishes when one cell holds nearly all the weight. Rows of weight 0 are dropped. No weights
    means all equal (``np.corrcoef``).

    Sparse input stays sparse: the second moment is the Gram matrix of the ``sqrt(p)``-scaled rows,
    formed from the non-zeros. Dense input is centred first (no cancellation). Genes that do not
    vary get correlation 0 with every other gene (and 1 with themselves). Fewer than two genes that
    vary (an all-zero count matrix, a constant layer) is a DataError that starts with ``where``:
    every pair would score 0 and the ranking would be arbitrary.
    """
    n_genes = matrix.shape[1]
    if weights is not None:
        weights = checked_weights(weights, where)
        if len(weights) != matrix.shape[0]:
            raise DataError(
                f"{where}: {len(weights)} cell weights for {matrix.shape[0]} cells; give one per cell."
            )
        counted = weights > 0
        if not counted.all():
            matrix, weights = matrix[counted], weights[counted]
    n_cells = matrix.shape[0]
    if n_cells < 2:
        counted_cells = "cells" if weights is None else "cells of positive weight"
        raise DataError(f"{where}: a correlation needs at least 2 {counted_cells}, got {n_cells}.")
    if weights is None:
        share = np.full(n_cells, 1.0 / n_cells)
    else:
        scaled_weights = weights / weights.max()  # a sum of huge weights must not overflow
        share = scaled_weights / scaled_weights.sum()
    if sp.issparse(matrix):
        matrix = sp.csr_matrix(matrix, dtype=np.float64)
        means = np.asarray(matrix.T @ share).ravel()
        rows_scaled = sp.diags(np.sqrt(share)) @ matrix
        covariance = (rows_scaled.T @ rows_scaled).toarray() - np.outer(means, means)
        spread = matrix.max(axis=0).toarray().ravel() - matrix.min(axis=0).toarray().ravel()
    else:
        matrix = np.asarray(matrix, dtype=np.float64)
        means = share @ matrix
        centred = matrix - means
        covariance = centred.T @ (centred * share[:, None])
        spread = np.ptp(matrix, axis=0)
    std = np.sqrt(np.clip(np.diag(covariance), 0, None))
    # A constant non-zero gene leaves rounding noise in its Gram variance (about 1e-8 of its mean
    # as a standard deviation): test constancy on the values themselves, not on that variance.
    constant = (spread == 0) | (std <= 1e-12 * max(1.0, float(np.abs(means).max(initial=0))))
    n_varying = int((~constant).sum())
    if n_varying < 2:
        raise DataError(
            f"{where}: {n_varying} of the {n_genes} genes {'varies' if n_varying == 1 else 'vary'} across "
            f"the {n_cells} cells, so every pair would score 0 and the ranking would be arbitrary. "
            "Check that the data holds expression (an all-zero count matrix, a constant layer or a "
            "too small sample/group gives this): use another layer or data, or more cells."
        )
    std[constant] = 1.0
    correlation = covariance / np.outer(std, std)
    correlation[constant, :] = 0.0
    correlation[:, constant] = 0.0
    np.fill_diagonal(correlation, 1.0)
    return np.clip(correlation, -1.0, 1.0)


class PearsonExtractor(Extractor):
    """Pearson co-expression (docs/methods/extractors.md#pearson-and-spearman) over a gene universe, optionally cell-weighted.

    Gene universe, in order of precedence: ``genes`` (an explicit list or file, see
    ``_universe.py``); else the ``n_top_genes`` genes of highest mean expression, the mean taken
    over every cell of the data (``universe_cells: all``, the default: every repeat of a sampler
    and the full-data reference score the same pairs) or over the step's own cells
    (``universe_cells: sample``); else every gene. The universe mean is plain (unweighted).

    Cells correlated (``variant``): ``all`` of the step's cells; only its ``case`` cells
    (``group_key == case``, a disease-only list); or ``case_minus_control``, corr(case) -
    corr(control). ``group_key`` defaults to ``data.label_key``; without a variant, setting
    ``group_key`` means ``case_minus_control`` (as before the variants existed).

    ``weighting: sample`` weights each cell by the sampler's weight (WDS: its inverse-density
    weight), see :func:`correlation_matrix`; without a sampler every weight is 1. Reads
    ``context.adata`` (the data, every cell), ``context.sample`` (the step's cells and weights).
    """

    name = "pearson"
    description = (
        "Gene pairs ranked by Pearson co-expression (all or case cells), or by corr(case) - corr(control)."
    )
    reference = "https://doi.org/10.1038/s41592-019-0690-6"
    needs: ClassVar[tuple[str, ...]] = ("data", "cells")

    class Params(UniverseParams):
        variant: Literal["all", "case", "case_minus_control"] | None = Field(
            None,
            description="cells to correlate: all; the case cells only; corr(case) - corr(control). "
            "None: case_minus_control when group_key is set, else all",
        )
        group_key: str | None = Field(
            None,
            description="obs column that splits the cells (variants case, case_minus_control); "
            "data.label_key when None",
        )
        case: str | None = Field(None, description="value of group_key for the case group (e.g. AD)")
        control: str | None = Field(None, description="value of group_key for the control group")
        layer: str | None = Field(None, description="expression layer to read; X when None")
        n_top_genes: int | None = Field(
            None, ge=2, description="gene universe: the most expressed genes (by mean); all genes when None"
        )
        universe_cells: Literal["all", "sample"] = Field(
            "all",
            description="cells whose mean picks the n_top_genes: every cell of the data (the same "
            "pairs for every sample and the reference) or only the step's cells",
        )
        weighting: Literal["uniform", "sample"] = Field(
            "uniform", description="cell weights: equal, or the sampler's (WDS inverse density)"
        )
        rank_by: Literal["abs", "value"] = Field(
            "abs", description="rank pairs by |score| (sign kept in 'sign') or by the signed score"
        )
        top_k: int | None = Field(None, ge=1, description="keep only the best pairs; all pairs when None")

        @model_validator(mode="after")
        def _groups_fit_the_variant(self) -> PearsonExtractor.Params:
            if self.variant == "all" and (self.group_key, self.case, self.control) != (None, None, None):
                raise ValueError(
                    "variant 'all' correlates over every cell, so group_key, case and control would be "
                    "ignored: remove them, or set variant to case or case_minus_control"
                )
            if self.variant == "case" and self.control is not None:
                raise ValueError(
                    f"variant 'case' correlates over the case cells only, so control {self.control!r} "
                    "would be ignored: remove it, or set variant: case_minus_control"
                )
            return self

    genes: list[str] | str | None
    variant: str | None
    group_key: str | None
    case: str | None
    control: str | None
    layer: str | None
    n_top_genes: int | None
    universe_cells: str
    weighting: str
    rank_by: str
    top_k: int | None

    def input_files(self) -> list[Path]:
        return universe_file(self.genes)

    # -- inputs ------------------------------------------------------------------------------

    def _layer_of(self, adata: Any) -> Any:
        if self.layer is not None and self.layer not in adata.layers:
            raise DataError(
                f"{self.name}: layer {self.layer!r} not found; layers: {', '.join(adata.layers) or 'none'}. "
                "Set params.layer to one of them, or null for X."
            )
        return adata.layers[self.layer] if self.layer is not None else adata.X

    def expression(self, context: RunContext):
        """The step's cells: (their AnnData, their matrix over the universe, its genes, their weights)."""
        adata, sample_weights = context.sampled_adata()
        matrix = self._layer_of(adata)
        self._require_finite(matrix, adata.obs_names)
        genes = np.asarray(adata.var_names)
        keep = self._universe(context, matrix, genes)
        if keep is not None:
            matrix, genes = matrix[:, keep], genes[keep]
        if self.weighting == "uniform":
            weights = np.ones(adata.n_obs)
        else:
            weights = checked_weights(
                sample_weights, f"extractor {self.name!r} (weighting: sample)", adata.obs_names
            )
        return adata, matrix, genes, weights

    def _universe(self, context: RunContext, matrix, genes: np.ndarray) -> np.ndarray | None:
        """Sorted column positions of the gene universe; None for every gene."""
        explicit = universe_indices(self.genes, genes, f"extractor {self.name!r}")
        if explicit is not None:
            return explicit
        if self.n_top_genes is None or self.n_top_genes >= len(genes):
            return None
        if self.universe_cells == "all":
            means = self._means_over_all_cells(context.require_adata(f"extractor {self.name!r}"))
        else:
            means = np.asarray(matrix.mean(axis=0), dtype=np.float64).ravel()
        return np.sort(np.argsort(-means, kind="stable")[: self.n_top_genes])

    def _means_over_all_cells(self, adata: Any) -> np.ndarray:
        """Per-gene mean over every cell of the data, read in row chunks (backed data stays on disk)."""
        total = np.zeros(adata.n_vars)
        for start in range(0, adata.n_obs, _MEAN_CHUNK_CELLS):
            chunk = self._layer_of(adata[start : start + _MEAN_CHUNK_CELLS])
            total += np.asarray(chunk.sum(axis=0), dtype=np.float64).ravel()
        means = total / max(adata.n_obs, 1)
        bad = ~np.isfinite(means)
        if bad.any():
            raise DataError(
                f"extractor {self.name!r}: {self._where()} holds NaN or infinite values for "
                f"{int(bad.sum())} genes (e.g. {', '.join(map(repr, map(str, adata.var_names[bad][:3])))}) "
                "over all cells, so the n_top_genes universe cannot be chosen (universe_cells: all). "
                "Drop empty cells first (qc_filter with min_counts: 1) or fix the step that made the "
                "values; or set params.genes to an explicit universe."
            )
        return means

    def _require_finite(self, matrix, cells: pd.Index) -> None:
        """Refuse NaN or inf expression: it makes the correlations of its genes NaN, silently dropped."""
        if sp.issparse(matrix):
            csr = sp.csr_matrix(matrix)
            bad_values = ~np.isfinite(csr.data)
            rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))[bad_values]
        else:
            bad = ~np.isfinite(np.asarray(matrix))
            bad_values, rows = bad, np.nonzero(bad)[0]
        n_bad = int(np.count_nonzero(bad_values))
        if not n_bad:
            return
        bad_cells = np.unique(rows)
        raise DataError(
            f"extractor {self.name!r}: {self._where()} holds {n_bad} NaN or infinite values in "
            f"{len(bad_cells)} cells (e.g. {', '.join(map(repr, map(str, cells[bad_cells[:3]])))}); their "
            "genes' correlations would be NaN. Fix the preprocessing step that made them (e.g. a "
            "custom step dividing by zero), or set params.layer to a layer without them."
        )

    def _where(self, group: str | None = None) -> str:
        layer = f"layer {self.layer!r}" if self.layer is not None else "X"
        return layer if group is None else f"{layer} of the {group}"

    # -- scores ------------------------------------------------------------------------------

    def transform_values(self, matrix, weights: np.ndarray):
        """Hook for rank-based variants: Pearson uses the values as they are."""
        return matrix

    def correlate(self, matrix, weights: np.ndarray, where: str) -> np.ndarray:
        uniform = self.weighting == "uniform"
        return correlation_matrix(self.transform_values(matrix, weights), where, None if uniform else weights)

    def scores(self, context: RunContext) -> tuple[np.ndarray, list[str], dict]:
        adata, matrix, genes, weights = self.expression(context)
        who = f"extractor {self.name!r}"
        info = {
            "n_genes": len(genes),
            "universe": universe_name(self.genes, self.universe_cells, len(genes), adata.n_vars),
            "weighting": self.weighting if context.sample is not None else "uniform",
        }
        variant = self.variant or ("all" if self.group_key is None else "case_minus_control")
        info["variant"] = variant
        if variant == "all":
            scores = self.correlate(matrix, weights, f"{who} on {self._where()}")
            return scores, list(genes), info
        group_key = self.group_key or context.roles.label_key
        if group_key is None:
            raise DataError(
                f"{who}: variant {variant!r} needs the column of the case/control label: set "
                "params.group_key, or data.label_key in the recipe."
            )
        if variant == "case":
            key, case = case_mask(context, adata, group_key, self.case, who, min_cells=2)
            where = f"{who} on {self._where(f'case group ({key} == {self.case!r})')}"
            info["n_case_cells"] = int(case.sum())
            return self.correlate(matrix[case], weights[case], where), list(genes), info
        key, masks = case_control_masks(context, adata, group_key, self.case, self.control, who, min_cells=2)
        correlations = {
            role: self.correlate(
                matrix[masks[role]],
                weights[masks[role]],
                f"{who} on {self._where(f'{role} group ({key} == {value!r})')}",
            )
            for role, value in (("case", self.case), ("control", self.control))
        }
        difference = correlations["case"] - correlations["control"]
        off_diagonal = ~np.eye(len(genes), dtype=bool)
        if not np.any(difference[off_diagonal]):
            raise DataError(
                f"{who}: corr(case) - corr(control) is 0 for every pair (the {self.case!r} and "
                f"{self.control!r} groups of obs[{key!r}] have the same correlations), so the ranking "
                "would be arbitrary. Check that case and control name different cells."
            )
        info |= {"n_case_cells": int(masks["case"].sum()), "n_control_cells": int(masks["control"].sum())}
        return difference, list(genes), info

    def extract(self, context: RunContext) -> Interactions:
        scores, genes, info = self.scores(context)
        return Interactions.from_matrix(
            scores,
            genes,
            directed=False,
            extractor=self.name,
            rank_by=self.rank_by,
            top_k=self.top_k,
            metadata=info,
        )
