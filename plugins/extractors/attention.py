"""Gene-gene interactions from a transformer's attention maps, aggregated over (weighted) cells."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from grnx_core import ComponentParams, DataError, Extractor, Interactions, RunContext
from grnx_core.components import AttentionModel


class AttentionExtractor(Extractor):
    """Weighted attention aggregation (Wu et al., NeurIPS 2024, section 3; ALGORITHMS.md section 5).

    For every cell ``c`` the model gives ``E_c``, its attention over its genes averaged over the
    chosen ``layers`` and ``heads`` (each layer from its own input). With the diagonal removed,
    for every ordered pair (a, b) of genes present in the cell:
    ``Z[a, b] += w_c * E_c[a, b]`` and ``M[a, b] += w_c``; the score is ``Z / M`` (float64),
    symmetrised for undirected output, and pairs never seen together are dropped. ``w_c`` is the
    sampler's weight of the cell (WDS: the inverse-density weight) or 1 (``weighting: uniform``,
    or when no sampler ran). Variants: ``all`` cells, ``case`` cells only (``group_key == case``),
    ``case_minus_control`` (score over case cells minus score over control cells, for the pairs
    seen in both groups; control = the ``control`` value, or every other labelled cell when None).

    The matrices span only the gene universe (genes present in the cells used, or the ``n_genes``
    most frequent of them), never the whole vocabulary. Gene names come from the tokens'
    vocabulary (token id -> gene id). Reads ``context.model`` (a model with ``attention``, e.g.
    celluformer, geneformer, scgpt), ``context.tokens`` and ``context.sample``.
    """

    name = "attention"
    description = "Gene pairs ranked by attention aggregated over cells: Z/M with per-cell (WDS) weights."
    reference = "https://arxiv.org/abs/2410.15616"
    needs: ClassVar[tuple[str, ...]] = ("tokens", "model", "cells")

    class Params(ComponentParams):
        variant: Literal["all", "case", "case_minus_control"] = Field(
            "all", description="cells to aggregate: all, case cells only, or case minus control"
        )
        group_key: str | None = Field(
            None, description="obs column of the case/control label; data.label_key when None"
        )
        case: str | None = Field(None, description="value of group_key marking case (disease) cells")
        control: str | None = Field(
            None, description="value marking control cells; every non-case cell when None"
        )
        weighting: Literal["sample", "uniform"] = Field(
            "sample", description="cell weights: the sampler's (WDS inverse density) or uniform"
        )
        layers: list[int] | None = Field(
            None, description="layers to average (negative from the end); all when None"
        )
        heads: list[int] | None = Field(None, description="heads to average; all when None")
        directed: bool = Field(False, description="keep A[a,b] and A[b,a] apart; undirected symmetrises")
        n_genes: int | None = Field(
            None,
            ge=2,
            description="gene universe: the genes present in most cells; all present genes when None",
        )
        batch_size: int = Field(8, ge=1, description="cells per forward pass")
        max_length: int | None = Field(None, ge=2, description="use each cell's first tokens only")
        top_k: int | None = Field(None, ge=1, description="keep only the best pairs; all pairs when None")
        max_memory_gb: float = Field(
            8.0, gt=0, description="refuse gene universes whose matrices exceed this"
        )

    def output_direction(self) -> str:
        # A[a, b]: the attention query gene a pays to key gene b; not a regulatory claim.
        return "query -> key (attention from source to target)" if self.directed else "undirected"

    # -- inputs ------------------------------------------------------------------------------

    def _model(self, context: RunContext) -> Any:
        model = context.model
        if model is None or not isinstance(model, AttentionModel):
            found = "no model" if model is None else f"model {getattr(model, 'name', type(model).__name__)!r}"
            raise DataError(
                f"extractor 'attention' needs a transformer with an attention API (celluformer, "
                f"geneformer, scgpt); the run has {found}. Add such a model to the recipe."
            )
        if context.tokens is None:
            raise DataError("extractor 'attention' needs tokenized cells; add a tokenizer to the recipe.")
        return model

    def _weights(self, context: RunContext) -> np.ndarray:
        n_cells = context.tokens.n_cells
        if self.weighting == "uniform" or context.sample is None:
            return np.ones(n_cells)
        weights = np.asarray(context.sample.weights, dtype=np.float64)
        if len(weights) != n_cells:
            raise DataError(
                f"extractor 'attention': the sample has {len(weights)} weights but the tokens hold "
                f"{n_cells} cells; the tokens must be the sampled cells in sample order."
            )
        return weights

    def _groups(self, context: RunContext) -> list[np.ndarray]:
        tokens = context.tokens
        everyone = np.arange(tokens.n_cells)
        if self.variant == "all":
            return [everyone]
        key = self.group_key or context.roles.label_key
        if key is None or self.case is None:
            raise DataError(
                f"extractor 'attention' variant {self.variant!r} needs params.case (the disease "
                f"label) and a label column (params.group_key or data.label_key)."
            )
        column = context.cell_column(tokens, key)
        if column is None:
            raise DataError(f"extractor 'attention': obs column {key!r} is not in the tokens or the data.")
        values = column.astype(str).to_numpy()
        labelled = ~pd.isna(column.to_numpy())
        case = np.flatnonzero(values == str(self.case))
        control = np.flatnonzero(
            labelled & (values != str(self.case)) if self.control is None else values == str(self.control)
        )
        found = ", ".join(sorted(set(values[labelled]))[:10])
        for role, cells, value in (("case", case, self.case), ("control", control, self.control)):
            if len(cells) == 0 and (role == "case" or self.variant == "case_minus_control"):
                raise DataError(
                    f"extractor 'attention': no {role} cells ({key} == {value!r}); values present: {found}."
                )
        return [case] if self.variant == "case" else [case, control]

    def _universe(self, model: Any, context: RunContext, cells: np.ndarray) -> np.ndarray:
        """Token ids of the genes the matrices span (sorted), excluding special tokens."""
        tokens = context.tokens
        special = set(getattr(model, "token_info_", {}).get("special_ids", []))
        per_cell = [
            np.unique(tokens.input_ids[tokens.offsets[c] : tokens.offsets[c + 1]][: self.max_length or None])
            for c in cells
        ]
        ids, counts = (
            np.unique(np.concatenate(per_cell), return_counts=True) if per_cell else (np.zeros(0), 0)
        )
        keep = ~np.isin(ids, list(special))
        ids, counts = ids[keep], np.asarray(counts)[keep]
        if self.n_genes is not None and self.n_genes < len(ids):
            chosen = np.argsort(-counts, kind="stable")[: self.n_genes]
            ids = np.sort(ids[chosen])
        return ids.astype(np.int64)

    # -- aggregation -------------------------------------------------------------------------

    def aggregate(
        self, model: Any, context: RunContext, cells: np.ndarray, weights: np.ndarray, universe: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(Z, M) over ``universe`` for ``cells``: Z[a,b] = sum_c w_c E_c[a,b], M[a,b] = sum_c w_c."""
        n_genes = len(universe)
        lookup = np.full(int(universe.max()) + 1 if n_genes else 1, -1, dtype=np.int64)
        lookup[universe] = np.arange(n_genes)
        z = np.zeros((n_genes, n_genes))
        m = np.zeros((n_genes, n_genes))
        maps = model.attention(
            context.tokens,
            cells=cells,
            layers=self.layers,
            heads=self.heads,
            batch_size=self.batch_size,
            max_length=self.max_length,
        )
        for cell_map in maps:
            ids = cell_map.token_ids.astype(np.int64)
            positions = np.where(ids < len(lookup), lookup[np.minimum(ids, len(lookup) - 1)], -1)
            inside = positions >= 0
            index = positions[inside]
            if len(index) < 2:
                continue
            weight = float(weights[cell_map.cell])
            attention = cell_map.attention[np.ix_(inside, inside)] if not inside.all() else cell_map.attention
            if not np.isfinite(attention).all():
                name = str(context.tokens.obs.index[cell_map.cell])
                raise DataError(
                    f"extractor 'attention': the model's attention over cell {name!r} (row {cell_map.cell}) "
                    "holds NaN or inf values, so the model's weights are not usable. Train it again with "
                    "a lower train.learning_rate (and train.max_grad_norm set), from inputs without NaN."
                )
            update = attention.astype(np.float64) * weight
            np.fill_diagonal(update, 0.0)
            if len(np.unique(index)) == len(index):
                pairs = np.ix_(index, index)
                z[pairs] += update
                m[pairs] += weight
            else:  # a gene twice in one cell: every occurrence counts
                rows, cols = index[:, None], index[None, :]
                np.add.at(z, (rows, cols), update)
                np.add.at(m, (rows, cols), weight)
        np.fill_diagonal(m, 0.0)
        return z, m

    def score(self, z: np.ndarray, m: np.ndarray) -> np.ndarray:
        if not self.directed:
            z, m = z + z.T, m + m.T
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.where(m > 0, z / np.where(m > 0, m, 1.0), np.nan)
        np.fill_diagonal(score, np.nan)
        return score

    def _require_scored_pairs(self, score: np.ndarray, groups: list[np.ndarray]) -> None:
        """Refuse a score matrix with no pair to rank: no two genes ever together in a cell (of both
        groups, for case minus control), or every pair scoring 0."""
        off_diagonal = score[~np.eye(len(score), dtype=bool)]
        finite = off_diagonal[np.isfinite(off_diagonal)]
        where = f"the {sum(len(c) for c in groups)} cells" + (" of both groups" if len(groups) == 2 else "")
        if not len(finite):
            raise DataError(
                f"extractor 'attention': no two genes of the universe appear together in {where}, so no "
                "pair has a score. Use cells with more expressed genes (or a larger max_length), or more cells."
            )
        if not np.any(finite):
            raise DataError(
                f"extractor 'attention': every pair scores 0 over {where}"
                + (" (case and control attend alike)" if len(groups) == 2 else "")
                + ", so the ranking would be arbitrary. Check the model and the case/control cells."
            )

    def extract(self, context: RunContext) -> Interactions:
        model = self._model(context)
        weights = self._weights(context)
        groups = self._groups(context)
        universe = self._universe(model, context, np.concatenate(groups))
        n_genes = len(universe)
        if n_genes < 2:
            raise DataError(f"extractor 'attention': only {n_genes} gene(s) in the cells; need 2 or more.")
        needed = n_genes**2 * (16 + 8 * len(groups)) + (0 if self.top_k else n_genes**2 * 24)
        if needed > self.max_memory_gb * 2**30:
            raise DataError(
                f"extractor 'attention': {n_genes} genes need about {needed / 2**30:.1f} GB, over "
                f"max_memory_gb={self.max_memory_gb}. Set params.n_genes (e.g. 5000) and/or params.top_k."
            )
        vocabulary = context.tokens.vocabulary
        if not vocabulary or int(universe.max()) >= len(vocabulary):
            raise DataError(
                "extractor 'attention': the tokens carry no vocabulary for their ids, so genes cannot "
                "be named. Use a grnx tokenizer (it records token id -> gene id)."
            )
        genes = [str(vocabulary[i]) for i in universe]
        scores = []
        for cells in groups:
            z, m = self.aggregate(model, context, cells, weights, universe)
            scores.append(self.score(z, m))
        score = scores[0] if len(scores) == 1 else scores[0] - scores[1]
        self._require_scored_pairs(score, groups)
        metadata = {
            "variant": self.variant,
            "weighting": self.weighting if context.sample is not None else "uniform",
            "n_cells": int(sum(len(c) for c in groups)),
            "n_genes": n_genes,
            "model": getattr(model, "name", type(model).__name__),
        }
        return Interactions.from_matrix(
            score,
            genes,
            directed=self.directed,
            extractor=self.name,
            top_k=self.top_k,
            metadata=metadata,
        )
