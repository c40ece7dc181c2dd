"""Gene-gene cosine similarity of a token model's gene embeddings (input table or contextual)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from grnx_core import DataError, Extractor, Interactions, RunContext
from grnx_core.components import GeneEmbeddingModel
from grnx_core.threads import torch_threads
from grnx_plugins.extractors._universe import UniverseParams, universe_file
from grnx_plugins.extractors.attention import cell_weights, token_universe


class EmbeddingSimilarityExtractor(Extractor):
    """Cosine similarity of gene embeddings (docs/methods/extractors.md#embedding-similarity), undirected.

    ``source: input``: each gene's row of the model's input gene-embedding table, the same for
    every cell. What a row is depends on the model: celluformer's embedding before it is scaled by
    the expression value, geneformer's BERT word embedding (before position embeddings and
    LayerNorm), scgpt's ``encoder(ids)`` (embedding then LayerNorm), which is what scGPT's GRN
    tutorial reads as gene embeddings and compares by cosine similarity (Cui et al., Nature
    Methods 2024; github.com/bowang-lab/scGPT, tutorials/Tutorial_GRN.ipynb and
    ``scgpt.tasks.GeneEmbedding``).

    ``source: contextual``: each gene's hidden state at hidden layer ``layer`` (0 = the embedding
    layer's output, k = the output of block k, -1 = the last block; default -1) in every cell
    where it is present, averaged over those cells in float64 with the sampler's weights
    (``weighting: sample``, WDS inverse density) or uniformly; batched forward passes. For
    celluformer, ``layer: 0`` is the value-scaled embedding, whose cell average points the same
    way as the input row (values are positive), so it ranks like ``source: input``.

    ``Score(a, b) = e_a . e_b / (|e_a| |e_b|)``. The gene universe is ``genes`` (an explicit list
    or file of gene ids), else the genes present in the cells used, or the ``n_genes`` present in
    most of them. A zero or non-finite embedding, and (contextual) a universe gene absent from
    every cell, are refused: their cosine is undefined. Reads ``context.model`` (celluformer,
    geneformer, scgpt), ``context.tokens`` and ``context.sample``.
    """

    name = "embedding_similarity"
    description = "Gene pairs ranked by cosine similarity of the model's input or contextual gene embeddings."
    reference = "https://doi.org/10.1038/s41592-024-02201-0"
    needs: ClassVar[tuple[str, ...]] = ("tokens", "model", "cells")

    class Params(UniverseParams):
        source: Literal["input", "contextual"] = Field(
            "input",
            description="input: rows of the input gene-embedding table; contextual: hidden states "
            "at 'layer' averaged over the cells where each gene is present",
        )
        layer: int | None = Field(
            None,
            description="contextual only: hidden layer (0 embeddings, k block k, negative from the end); -1 when None",
        )
        weighting: Literal["sample", "uniform"] = Field(
            "sample", description="contextual: cell weights, the sampler's (WDS inverse density) or uniform"
        )
        n_genes: int | None = Field(
            None,
            ge=2,
            description="gene universe: the genes present in most cells; all present genes when None",
        )
        rank_by: Literal["value", "abs"] = Field(
            "value", description="rank by similarity (most similar first) or by |similarity|"
        )
        batch_size: int = Field(8, ge=1, description="contextual: cells per forward pass")
        top_k: int | None = Field(None, ge=1, description="keep only the best pairs; all pairs when None")
        max_memory_gb: float = Field(
            8.0, gt=0, description="refuse gene universes whose matrices exceed this"
        )

        @model_validator(mode="after")
        def _layer_only_for_contextual(self) -> EmbeddingSimilarityExtractor.Params:
            if self.source == "input" and self.layer is not None:
                raise ValueError(
                    f"layer={self.layer} applies to source 'contextual' only; the input embedding "
                    "has no layer. Remove layer or set source: contextual."
                )
            return self

    def input_files(self) -> list[Path]:
        return universe_file(self.genes)

    # -- inputs ------------------------------------------------------------------------------

    def _model(self, context: RunContext) -> Any:
        model = context.model
        if model is None or not isinstance(model, GeneEmbeddingModel):
            found = "no model" if model is None else f"model {getattr(model, 'name', type(model).__name__)!r}"
            raise DataError(
                f"extractor {self.name!r} needs a token model with gene embeddings (celluformer, "
                f"geneformer, scgpt); the run has {found}. Add such a model to the recipe."
            )
        if context.tokens is None:
            raise DataError(f"extractor {self.name!r} needs tokenized cells; add a tokenizer to the recipe.")
        return model

    def _universe(self, model: Any, context: RunContext) -> np.ndarray:
        special = [int(i) for i in getattr(model, "token_info_", {}).get("special_ids", [])]
        tokens = context.tokens
        universe = token_universe(
            tokens, np.arange(tokens.n_cells), special, n_genes=self.n_genes, genes=self.genes, who=self.name
        )
        if len(universe) < 2:
            raise DataError(
                f"extractor {self.name!r}: only {len(universe)} gene(s) in the {tokens.n_cells} cells; "
                "need 2 or more."
            )
        needed = len(universe) ** 2 * 40
        if needed > self.max_memory_gb * 2**30:
            raise DataError(
                f"extractor {self.name!r}: {len(universe)} genes need about {needed / 2**30:.1f} GB, over "
                f"max_memory_gb={self.max_memory_gb}. Set params.n_genes (e.g. 5000) and/or params.top_k."
            )
        if not tokens.vocabulary or int(universe.max()) >= len(tokens.vocabulary):
            raise DataError(
                f"extractor {self.name!r}: the tokens carry no vocabulary for their ids, so genes cannot "
                "be named. Use a grnx tokenizer (it records token id -> gene id)."
            )
        return universe

    # -- embeddings --------------------------------------------------------------------------

    def contextual_embeddings(
        self, model: Any, context: RunContext, universe: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(weighted mean hidden state per universe gene (n, d), summed cell weight per gene)."""
        tokens = context.tokens
        weights = cell_weights(context, self.weighting, self.name)
        lookup = np.full(int(universe.max()) + 1, -1, dtype=np.int64)
        lookup[universe] = np.arange(len(universe))
        sums: np.ndarray | None = None
        weight_sums = np.zeros(len(universe))
        layer = -1 if self.layer is None else self.layer
        states = model.contextual_gene_embeddings(
            tokens, cells=np.arange(tokens.n_cells), layer=layer, batch_size=self.batch_size
        )
        for cell, ids, hidden in states:
            ids = np.asarray(ids, dtype=np.int64)
            positions = np.where(ids < len(lookup), lookup[np.minimum(ids, len(lookup) - 1)], -1)
            inside = positions >= 0
            if not inside.any():
                continue
            if sums is None:
                sums = np.zeros((len(universe), hidden.shape[1]))
            index = positions[inside]
            weight = float(weights[cell])
            update = weight * np.asarray(hidden, dtype=np.float64)[inside]
            if len(np.unique(index)) == len(index):
                sums[index] += update
                weight_sums[index] += weight
            else:  # a gene twice in one cell: every occurrence counts
                np.add.at(sums, index, update)
                np.add.at(weight_sums, index, weight)
        absent = np.flatnonzero(weight_sums <= 0)
        if sums is None or len(absent):
            names = [str(tokens.vocabulary[universe[i]]) for i in absent[:5]]
            raise DataError(
                f"extractor {self.name!r}: {len(absent)} of the {len(universe)} universe genes are in none "
                f"of the {tokens.n_cells} cells (with positive weight), e.g. {', '.join(map(repr, names))}, "
                "so they have no contextual embedding. Drop them from params.genes, use more cells, or "
                "use source: input."
            )
        return sums / weight_sums[:, None], weight_sums

    def embeddings(self, model: Any, context: RunContext, universe: np.ndarray) -> np.ndarray:
        if self.source == "input":
            return np.asarray(model.input_gene_embeddings(context.tokens, universe), dtype=np.float64)
        return self.contextual_embeddings(model, context, universe)[0]

    def cosine(self, vectors: np.ndarray, genes: list[str]) -> np.ndarray:
        """Cosine similarity between the rows; zero or non-finite rows are refused."""
        norms = np.linalg.norm(vectors, axis=1)
        bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
        if len(bad):
            raise DataError(
                f"extractor {self.name!r}: the {self.source} embeddings of {len(bad)} genes are zero or "
                f"not finite (e.g. {', '.join(repr(genes[i]) for i in bad[:5])}), so their cosine "
                "similarity is undefined. Check that the model was trained (a NaN loss gives this) "
                "and that the genes are real tokens, not padding."
            )
        unit = vectors / norms[:, None]
        similarity = np.clip(unit @ unit.T, -1.0, 1.0)
        np.fill_diagonal(similarity, np.nan)
        return similarity

    def extract(self, context: RunContext) -> Interactions:
        with torch_threads(context):  # execution.num_threads / GRNX_NUM_THREADS, as for training
            return self._extract(context)

    def _extract(self, context: RunContext) -> Interactions:
        model = self._model(context)
        universe = self._universe(model, context)
        genes = [str(context.tokens.vocabulary[i]) for i in universe]
        similarity = self.cosine(self.embeddings(model, context, universe), genes)
        off_diagonal = similarity[~np.eye(len(genes), dtype=bool)]
        if np.ptp(off_diagonal) == 0:
            raise DataError(
                f"extractor {self.name!r}: every pair has the same similarity "
                f"({off_diagonal[0]:.3g}), so the ranking would be arbitrary. Check the model's embeddings."
            )
        metadata = {
            "source": self.source,
            "layer": None if self.source == "input" else (-1 if self.layer is None else self.layer),
            "weighting": "none"
            if self.source == "input"
            else (self.weighting if context.sample is not None else "uniform"),
            "n_cells": int(context.tokens.n_cells),
            "n_genes": len(genes),
            "model": getattr(model, "name", type(model).__name__),
        }
        return Interactions.from_matrix(
            similarity,
            genes,
            directed=False,
            extractor=self.name,
            rank_by=self.rank_by,
            top_k=self.top_k,
            metadata=metadata,
        )
