"""Pearson co-expression, or its difference between two groups of cells."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import Field

from grnx_core import ComponentParams, DataError, Extractor, Interactions, RunContext


def correlation_matrix(matrix: np.ndarray | sp.spmatrix, where: str = "Pearson correlation") -> np.ndarray:
    """Pearson correlation between the columns of a cells x genes matrix, in float64.

    Sparse input stays sparse: the Gram matrix ``X^T X`` is formed from the non-zeros. Genes that
    do not vary get correlation 0 with every other gene (and 1 with themselves). Fewer than two
    genes that vary (an all-zero count matrix, a constant layer) is a DataError that starts with
    ``where``: every pair would score 0 and the ranking would be arbitrary.
    """
    n_cells, n_genes = matrix.shape
    if n_cells < 2:
        raise DataError(f"{where}: a correlation needs at least 2 cells, got {n_cells}.")
    if sp.issparse(matrix):
        matrix = sp.csr_matrix(matrix, dtype=np.float64)
        gram = (matrix.T @ matrix).toarray()
        means = np.asarray(matrix.mean(axis=0)).ravel()
        spread = matrix.max(axis=0).toarray().ravel() - matrix.min(axis=0).toarray().ravel()
    else:
        matrix = np.asarray(matrix, dtype=np.float64)
        gram = matrix.T @ matrix
        means = matrix.mean(axis=0)
        spread = np.ptp(matrix, axis=0)
    covariance = (gram - n_cells * np.outer(means, means)) / (n_cells - 1)
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
    name = "pearson"
    description = "Gene pairs ranked by Pearson co-expression, or by corr(case) - corr(control)."
    reference = "https://doi.org/10.1038/s41592-019-0690-6"
    needs: ClassVar[tuple[str, ...]] = ("data", "cells")

    class Params(ComponentParams):
        group_key: str | None = Field(
            None, description="obs column that splits the cells; None correlates over all cells"
        )
        case: str | None = Field(None, description="value of group_key for the case group (e.g. AD)")
        control: str | None = Field(None, description="value of group_key for the control group")
        layer: str | None = Field(None, description="expression layer to read; X when None")
        n_top_genes: int | None = Field(
            None, ge=2, description="gene universe: the most expressed genes (by mean); all genes when None"
        )
        rank_by: Literal["abs", "value"] = Field(
            "abs", description="rank pairs by |score| (sign kept in 'sign') or by the signed score"
        )
        top_k: int | None = Field(None, ge=1, description="keep only the best pairs; all pairs when None")

    group_key: str | None
    case: str | None
    control: str | None
    layer: str | None
    n_top_genes: int | None
    rank_by: str
    top_k: int | None

    def expression(self, context: RunContext):
        adata, _ = context.sampled_adata()
        if self.layer is not None and self.layer not in adata.layers:
            raise DataError(
                f"{self.name}: layer {self.layer!r} not found; layers: {', '.join(adata.layers) or 'none'}. "
                "Set params.layer to one of them, or null for X."
            )
        matrix = adata.layers[self.layer] if self.layer is not None else adata.X
        self._require_finite(matrix, adata.obs_names)
        genes = np.asarray(adata.var_names)
        if self.n_top_genes is not None and self.n_top_genes < len(genes):
            means = np.asarray(matrix.mean(axis=0)).ravel()
            keep = np.sort(np.argsort(-means, kind="stable")[: self.n_top_genes])
            matrix, genes = matrix[:, keep], genes[keep]
        return adata, matrix, genes

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
            "genes' correlations would be NaN. normalize_total makes NaN when the median cell has no "
            "counts (an all-zero or mostly empty matrix): drop empty cells first (the qc_filter "
            "preprocessor with min_counts: 1) and check the counts; else fix the step that made the "
            "values, or set params.layer to a layer without them."
        )

    def _where(self, group: str | None = None) -> str:
        layer = f"layer {self.layer!r}" if self.layer is not None else "X"
        return layer if group is None else f"{layer} of the {group}"

    def transform_values(self, matrix):
        """Hook for rank-based variants: Pearson uses the values as they are."""
        return matrix

    def scores(self, context: RunContext) -> tuple[np.ndarray, list[str], dict]:
        adata, matrix, genes = self.expression(context)
        who = f"extractor {self.name!r}"
        if self.group_key is None:
            scores = correlation_matrix(self.transform_values(matrix), f"{who} on {self._where()}")
            return scores, list(genes), {}
        key = context.require_obs(self.group_key, "group_key", f"extractor {self.name!r}")
        groups = adata.obs[key].astype(str).to_numpy()
        found = sorted(set(groups))
        if self.case is None or self.control is None:
            raise DataError(
                f"{self.name}: with group_key {key!r}, set params.case and params.control to two of its "
                f"values ({', '.join(found[:10])})."
            )
        masks = {}
        for role, value in (("case", self.case), ("control", self.control)):
            masks[role] = groups == str(value)
            if masks[role].sum() < 2:
                raise DataError(
                    f"{self.name}: {role} group {value!r} of obs[{key!r}] has {int(masks[role].sum())} cells "
                    f"(needs 2 or more). Values present: {', '.join(found[:10])}."
                )
        correlations = {
            role: correlation_matrix(
                self.transform_values(matrix[masks[role]]),
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
        info = {"n_case_cells": int(masks["case"].sum()), "n_control_cells": int(masks["control"].sum())}
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
