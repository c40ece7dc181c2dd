"""Pearson co-expression, or its difference between two groups of cells."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import scipy.sparse as sp
from pydantic import Field

from grnx_core import ComponentParams, DataError, Extractor, Interactions, RunContext


def correlation_matrix(matrix: np.ndarray | sp.spmatrix) -> np.ndarray:
    """Pearson correlation between the columns of a cells x genes matrix, in float64.

    Sparse input stays sparse: the Gram matrix ``X^T X`` is formed from the non-zeros. Genes that
    do not vary get correlation 0 with every other gene (and 1 with themselves).
    """
    n_cells = matrix.shape[0]
    if n_cells < 2:
        raise DataError(f"Pearson correlation needs at least 2 cells, got {n_cells}.")
    if sp.issparse(matrix):
        matrix = sp.csr_matrix(matrix, dtype=np.float64)
        gram = (matrix.T @ matrix).toarray()
        means = np.asarray(matrix.mean(axis=0)).ravel()
    else:
        matrix = np.asarray(matrix, dtype=np.float64)
        gram = matrix.T @ matrix
        means = matrix.mean(axis=0)
    covariance = (gram - n_cells * np.outer(means, means)) / (n_cells - 1)
    std = np.sqrt(np.clip(np.diag(covariance), 0, None))
    constant = std <= 1e-12 * max(1.0, float(np.abs(means).max(initial=0)))
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
        genes = np.asarray(adata.var_names)
        if self.n_top_genes is not None and self.n_top_genes < len(genes):
            means = np.asarray(matrix.mean(axis=0)).ravel()
            keep = np.sort(np.argsort(-means, kind="stable")[: self.n_top_genes])
            matrix, genes = matrix[:, keep], genes[keep]
        return adata, matrix, genes

    def transform_values(self, matrix):
        """Hook for rank-based variants: Pearson uses the values as they are."""
        return matrix

    def scores(self, context: RunContext) -> tuple[np.ndarray, list[str], dict]:
        adata, matrix, genes = self.expression(context)
        if self.group_key is None:
            return correlation_matrix(self.transform_values(matrix)), list(genes), {}
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
        case = correlation_matrix(self.transform_values(matrix[masks["case"]]))
        control = correlation_matrix(self.transform_values(matrix[masks["control"]]))
        info = {"n_case_cells": int(masks["case"].sum()), "n_control_cells": int(masks["control"].sum())}
        return case - control, list(genes), info

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
