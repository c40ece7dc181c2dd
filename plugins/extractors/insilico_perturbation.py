"""In silico perturbation (Geneformer): delete or overexpress genes, measure how cell and gene embeddings move."""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from grnx_core import ComponentParams, DataError, Extractor, Interactions, RunContext, TokenizedCells
from grnx_core.components import GeneEmbeddingModel, role_field, seed_field
from grnx_core.progress import progress
from grnx_core.threads import torch_threads
from grnx_plugins.extractors import _perturbation_stats as perturbation_stats
from grnx_plugins.extractors._perturbed_tokens import (
    PerturbationBuilder,
    PerturbedBatch,
    chosen_genes,
    each_present_gene,
)
from grnx_plugins.extractors._universe import read_gene_list
from grnx_plugins.extractors.attention import token_universe

#: copies embedded per chunk, in multiples of batch_size: bounds the originals' states held at once
_CHUNK_BATCHES = 32
#: rows per slice when comparing gene states in float64 (bounds the working memory)
_SLICE_ROWS = 16_384


@dataclass
class _Targets:
    """What is perturbed: one target per gene (or one for the whole group), with its token ids."""

    labels: list[str]
    groups: list[np.ndarray]
    #: token id -> target index (-1: not a target); None in group mode
    lookup: np.ndarray | None

    @property
    def n_targets(self) -> int:
        return len(self.labels)


@dataclass
class _States:
    """Cells of the start state (the ones perturbed) and the goal and alternative states' cells."""

    start: np.ndarray
    ends: dict[str, np.ndarray]  # goal first, then the alternative states, in the recipe's order


class _PairShifts:
    """Sums of ``1 - cos`` of each affected gene's state (perturbed vs original) per gene pair,
    kept on the model's device (float64) so the hidden states never leave it."""

    def __init__(
        self,
        labels: list[str],
        columns: np.ndarray,
        row_of_target: np.ndarray,
        column_of: np.ndarray,
        n_targets: int,
    ) -> None:
        self.labels, self.columns = labels, columns
        self.row_of_target, self.column_of, self.n_targets = row_of_target, column_of, n_targets
        self._sums: Any = None  # torch tensors, made on the first batch's device
        self._counts: Any = None

    def add(
        self,
        batch: PerturbedBatch,
        rows: np.ndarray,
        hidden: Any,
        keep: Any,
        original_states: Any,
    ) -> None:
        """Add the copies ``rows`` of ``batch`` (states ``hidden`` (B, L, d), gene tokens ``keep``)."""
        import torch

        device = hidden.device
        n_columns = len(self.columns)
        if self._sums is None:
            self._sums = torch.zeros(len(self.labels) * n_columns, dtype=torch.float64, device=device)
            self._counts = torch.zeros(len(self.labels) * n_columns, dtype=torch.int64, device=device)
        perturbed = batch.perturbed
        targets = batch.target[rows]
        tested = targets < self.n_targets  # null copies take no part in the pairs
        source = np.full(len(rows), -1, dtype=np.int64)
        source[tested] = self.row_of_target[targets[tested]]
        width = hidden.shape[1]
        origin = np.full((len(rows), width), -1, dtype=np.int64)
        column = np.full((len(rows), width), -1, dtype=np.int64)
        for b, row in enumerate(rows):
            start, stop = perturbed.offsets[row], perturbed.offsets[row + 1]
            origin[b, : stop - start] = batch.origin[start:stop]
            column[b, : stop - start] = self.column_of[perturbed.input_ids[start:stop]]
        valid = keep.cpu().numpy() & (origin >= 0) & (column >= 0) & (source[:, None] >= 0)
        copy_index, positions = np.nonzero(valid)
        compare = batch.compare_with[rows]
        for start in range(0, len(copy_index), _SLICE_ROWS):
            b, j = copy_index[start : start + _SLICE_ROWS], positions[start : start + _SLICE_ROWS]
            on_device = torch.as_tensor
            after = hidden[on_device(b, device=device), on_device(j, device=device)].double()
            before = original_states[
                on_device(compare[b], device=device), on_device(origin[b, j], device=device)
            ].double()
            flat = on_device(source[b] * n_columns + column[b, j], device=device)
            self._sums.index_add_(0, flat, _one_minus_cosine(after, before))
            self._counts.index_add_(0, flat, torch.ones_like(flat))

    def totals(self) -> tuple[np.ndarray, np.ndarray]:
        """(sums, counts) as (n perturbed, n affected) arrays."""
        shape = (len(self.labels), len(self.columns))
        if self._sums is None:
            return np.zeros(shape), np.zeros(shape, dtype=np.int64)
        return self._sums.cpu().numpy().reshape(shape), self._counts.cpu().numpy().reshape(shape)


@dataclass
class _Run:
    """What the perturbation loop measured."""

    measures: list[str]
    values: np.ndarray  # (n_copies, n_measures) for the tested targets
    target: np.ndarray  # (n_copies,)
    null_values: np.ndarray  # (n_null, n_measures), vs_null only
    null_owner: np.ndarray  # (n_null,) tested target of the null gene, -1 for none
    pairs: _PairShifts
    n_cells: int


# The vector helpers take torch tensors (through their methods only, so this module does not
# import torch when the plugin is listed) and run on the model's device.


def _unit(vectors: Any) -> Any:
    return vectors / vectors.norm(dim=-1, keepdim=True)


def _one_minus_cosine(a: Any, b: Any) -> Any:
    """``1 - cos(a, b)`` row by row as ``|a/|a| - b/|b||^2 / 2``, exact for tiny shifts where the
    difference of two numbers near 1 would lose the digits."""
    difference = _unit(a) - _unit(b)
    return 0.5 * (difference * difference).sum(dim=-1)


def _masked_mean(hidden: Any, keep: Any) -> Any:
    """Mean over the gene tokens of each row in float64 (Geneformer's ``mean_nonpadding_embs``)."""
    weights = keep.double()
    sums = (hidden.double() * weights[..., None]).sum(dim=1)
    return sums / weights.sum(dim=1, keepdim=True).clamp(min=1.0)


def shift_plot(table: pd.DataFrame, shift_column: str, fdr_column: str | None, alpha: float, title: str):
    """Each gene's mean shift against -log10 FDR (a volcano plot), or against its rank without
    statistics; significant genes in colour, the first ten rows of the table named."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 5), layout="constrained")
    axes = figure.subplots()
    shown = table[np.isfinite(table[shift_column].to_numpy(dtype=np.float64))]
    x = shown[shift_column].to_numpy(dtype=np.float64)
    if fdr_column is not None:
        fdr = shown[fdr_column].to_numpy(dtype=np.float64)
        y = -np.log10(np.clip(fdr, 1e-300, 1.0))
        significant = fdr < alpha
        axes.axhline(-np.log10(alpha), color="grey", linestyle="--", linewidth=0.8, label=f"FDR {alpha}")
        axes.set_ylabel(f"-log10 {fdr_column}")
    else:
        y = np.arange(len(shown), 0, -1, dtype=np.float64)
        significant = np.zeros(len(shown), dtype=bool)
        axes.set_ylabel("rank (top = largest shift)")
    axes.scatter(x[~significant], y[~significant], s=8, color="#8d99ae", label="not significant")
    if significant.any():
        axes.scatter(x[significant], y[significant], s=12, color="#e76f51", label="significant")
    for index, (gene, xi, yi) in enumerate(list(zip(shown["Gene"], x, y))[:10]):
        # staggered, so that names of genes with near-equal values stay readable
        offset = (4, 4 + 8 * (index % 4))
        axes.annotate(str(gene), (xi, yi), fontsize=7, xytext=offset, textcoords="offset points")
    axes.axvline(0, color="grey", linewidth=0.6)
    axes.set_xlabel(shift_column)
    axes.set_title(title)
    axes.legend(loc="best", fontsize=8)
    return figure


class InsilicoPerturbationExtractor(Extractor):
    """In silico deletion / overexpression (Theodoris et al., Nature 2023; docs/methods/extractors.md#in-silico-perturbation).

    Follows Geneformer's ``InSilicoPerturber`` and ``InSilicoPerturberStats``
    (``geneformer/in_silico_perturber.py``, ``perturber_utils.py``, ``in_silico_perturber_stats.py``;
    read at github.com/haroonshakeel/Geneformer, a mirror of huggingface.co/ctheodoris/Geneformer).

    **Perturbations** (built from the existing tokens, :mod:`._perturbed_tokens`): ``delete``
    removes the gene's token, ``overexpress`` moves it to the front of the rank-value sequence
    (after ``<cls>``; an absent gene of a list is inserted there, the cell cut back to the model's
    input size). ``genes: all`` perturbs every gene of every perturbed cell, one at a time
    (overexpress skips a cell's first gene, already at the front); a list perturbs each listed gene
    alone, or, with ``group: true``, all of them together (``delete`` then uses the cells holding
    every listed gene, as Geneformer filters them). Overexpression needs rank-value tokens
    (geneformer); celluformer and scgpt tokens carry values and no order, so only ``delete`` is
    defined for them.

    **Cells**: with ``start_state`` the cells whose ``state_key`` value is ``start_state``, else
    all the step's cells; at most ``max_cells`` of them, drawn with ``seed`` (Geneformer:
    ``shuffle(seed=42)`` then the first ``max_ncells``). Each unperturbed cell is embedded once;
    its perturbed copies are batched across cells by length.

    **Embeddings**: the hidden state ``layer`` (0 the embedding output, k block k, negative from
    the end; None: the model's cell-embedding layer, geneformer's ``embedding_layer`` = -2, the
    penultimate, Geneformer's default ``emb_layer=-1``). A cell's embedding is the mean of its
    gene-token states (special tokens excluded; Geneformer's ``cell_emb_style="mean_pool"``, which
    is what geneformer and celluformer's ``embed`` give; for scgpt it is its ``avg-pool``, not its
    ``<cls>`` state). A state's embedding is the mean embedding of its cells (``max_state_cells`` of
    them at most), the ``state_embs_dict`` Geneformer asks the user for. ``precision: bfloat16``
    runs the forward passes under ``torch.autocast`` (faster on GPUs and AMX CPUs; Geneformer
    offers 8-bit quantised inference for the same reason); shifts then differ slightly from
    float32's (within 1e-5 on the test models and the benchmark).

    **Per-copy measures**: with ``goal_state``, ``shift_s = cos(perturbed, E_s) - cos(original,
    E_s)`` for the goal and each of ``alt_states`` (Geneformer's ``cos_sim_shift``); without,
    ``1 - cos(perturbed, original)`` of the cell embeddings (Geneformer instead averages the genes'
    cosines there). **Statistics** (:mod:`._perturbation_stats`): ``vs_others``, Wilcoxon rank-sum
    of each gene's shifts against the pooled shifts of all *other* perturbations, down-sampled to
    ``null_size`` with ``seed`` (Geneformer's goal-state mode pools the tested gene into its own
    null; grnx does not); ``vs_null``, against the shifts of ``null_genes_per_cell`` random genes
    perturbed in the same cells (a gene's own entries left out), with or without cell states;
    Benjamini-Hochberg FDR; ``Sig = FDR < fdr_alpha``. The table (columns ``Gene``,
    ``Shift_to_goal_end``, ``Shift_to_alt_end_<s>``, ``Goal_end_vs_random_pval``,
    ``Alt_end_vs_random_pval_<s>``, ``Goal_end_FDR``, ``Alt_end_FDR_<s>``, ``N_Detections``,
    ``Sig``; without states ``Shift``, ``Cosine_sim_mean``, ``Shift_vs_random_pval``,
    ``Shift_FDR``), sorted by Sig, shift and FDR as Geneformer sorts it, is logged as the artifact
    ``perturbation/<tag>.parquet`` with a figure ``perturbation/<tag>_shifts.png``; its first
    rows are in the interactions' metadata.

    **Interactions** (Geneformer's ``emb_mode="cell_and_gene"``): for each perturbed gene a and
    each other gene b of the cell, ``1 - cos`` of b's state in the perturbed and the original
    cell; the score of the directed pair a -> b is its mean over the cells (``n_detections``
    column), pairs seen in fewer than ``min_detections`` cells dropped. Pairs span the ``n_genes``
    (default 2,000) genes present in most perturbed cells, or all of them (None); every gene is
    still perturbed and tested, the universe only bounds the dense pair matrix. A group's pairs have
    the source ``GENE1+GENE2+...``. With a positional model (geneformer) deleting or moving a gene
    also moves the genes after it by one position, so an affected gene's shift mixes the perturbed
    gene's effect with that of its own new position (as in Geneformer's ``cell_and_gene`` mode).

    Reads ``context.model`` (geneformer, celluformer, scgpt) and ``context.tokens`` (the state
    column must be carried with them: a data role column).
    """

    name = "insilico_perturbation"
    description = (
        "Geneformer in silico deletion/overexpression: cosine shifts toward a goal cell state with "
        "rank-sum statistics, and gene-gene embedding shifts as interactions."
    )
    reference = "https://doi.org/10.1038/s41586-023-06139-9"
    needs: ClassVar[tuple[str, ...]] = ("tokens", "model", "cells")
    direction: ClassVar[str] = "perturbed gene -> affected gene (shift of its embedding)"

    class Params(ComponentParams):
        perturb_type: Literal["delete", "overexpress"] = Field(
            "delete",
            description="delete: remove the gene's token; overexpress: move it to the front of the "
            "rank-value sequence (rank-value tokens only)",
        )
        genes: list[str] | str = Field(
            "all",
            description="genes to perturb: 'all' (every gene of every perturbed cell, one at a time), "
            "a list of gene ids, or a text file with one gene id per line",
        )
        group: bool = Field(False, description="perturb the listed genes together, as one group")
        max_cells: int | None = Field(
            None, ge=1, description="perturb at most this many cells (drawn with seed); all when None"
        )
        layer: int | None = Field(
            None,
            description="hidden layer of the embeddings (0 embeddings, k block k, negative from the "
            "end); None: the model's cell-embedding layer (geneformer: embedding_layer)",
        )
        state_key: str | None = role_field("cell_type_key", "obs column holding the cell states")
        start_state: str | None = Field(
            None, description="state_key value of the cells to perturb; all cells when None"
        )
        goal_state: str | None = Field(
            None, description="state_key value whose mean embedding the shifts are measured toward"
        )
        alt_states: list[str] = Field(
            default_factory=list, description="alternative end states, shifts reported for each"
        )
        max_state_cells: int | None = Field(
            None, ge=1, description="state embeddings from at most this many cells per state; all when None"
        )
        statistics: Literal["vs_others", "vs_null", "none"] = Field(
            "vs_others",
            description="vs_others: each gene's shifts against all other perturbations' shifts; "
            "vs_null: against random genes perturbed in the same cells; none",
        )
        null_size: int | None = Field(
            100_000, ge=1, description="down-sample the pooled null to this many shifts (Geneformer: 100,000)"
        )
        null_genes_per_cell: int = Field(
            10, ge=1, description="vs_null: random genes (or groups) perturbed per cell for the null"
        )
        fdr_alpha: float = Field(0.05, gt=0.0, lt=1.0, description="Sig = 1 where the FDR is below this")
        n_genes: int | None = Field(
            2000,
            ge=2,
            description="gene-gene pairs among the n_genes genes present in most perturbed cells (a "
            "dense n_genes^2 matrix); all present genes when None",
        )
        min_detections: int = Field(1, ge=1, description="gene-gene pairs seen in fewer cells are dropped")
        top_k: int | None = Field(None, ge=1, description="keep only the best gene-gene pairs; all when None")
        batch_size: int = Field(16, ge=1, description="cells per forward pass")
        precision: Literal["float32", "bfloat16"] = Field(
            "float32",
            description="bfloat16: forward passes under torch.autocast, about 2x faster on CPUs with "
            "AMX (and on GPUs), shifts slightly off float32's (measured: within 1e-5); float32: exact",
        )
        max_memory_gb: float = Field(8.0, gt=0, description="refuse gene-gene matrices larger than this")
        seed: int | None = seed_field(
            "seed of the cell cap, the null's down-sampling and the random null genes"
        )

        @model_validator(mode="after")
        def _consistent(self) -> InsilicoPerturbationExtractor.Params:
            listed = not (isinstance(self.genes, str) and self.genes == "all")
            if isinstance(self.genes, list):
                if not self.genes:
                    raise ValueError("genes is an empty list; name the genes to perturb, or use 'all'")
                repeated = sorted({g for g in self.genes if self.genes.count(g) > 1})
                if repeated:
                    raise ValueError(f"genes names {', '.join(map(repr, repeated))} more than once")
            if self.group and not listed:
                raise ValueError("group: true perturbs a list of genes together; give genes as a list")
            if self.statistics == "vs_others" and self.group:
                raise ValueError(
                    "statistics vs_others compares a gene with the other genes' perturbations, but a "
                    "group is one perturbation; use statistics: vs_null (random genes) or none"
                )
            if self.statistics == "vs_others" and isinstance(self.genes, list) and len(self.genes) < 2:
                raise ValueError(
                    "statistics vs_others needs at least 2 perturbed genes (the others are the null); "
                    "use statistics: vs_null or none for one gene"
                )
            if self.goal_state is not None and self.start_state is None:
                raise ValueError("goal_state needs start_state (the cells perturbed toward the goal)")
            if self.alt_states and self.goal_state is None:
                raise ValueError("alt_states need a goal_state")
            states = [s for s in (self.start_state, self.goal_state, *self.alt_states) if s is not None]
            if len(states) != len(set(states)):
                raise ValueError(f"start_state, goal_state and alt_states must all differ; got {states}")
            return self

    def input_files(self) -> list[Path]:
        listed_file = isinstance(self.genes, str) and self.genes != "all"
        return [Path(self.genes).expanduser()] if listed_file else []

    # -- inputs ------------------------------------------------------------------------------

    def _model(self, context: RunContext) -> Any:
        model = context.model
        if model is None or not isinstance(model, GeneEmbeddingModel) or not hasattr(model, "token_info_"):
            found = "no model" if model is None else f"model {getattr(model, 'name', type(model).__name__)!r}"
            raise DataError(
                f"extractor {self.name!r} needs a fitted token model (geneformer, celluformer, scgpt); "
                f"the run has {found}. Add such a model to the recipe."
            )
        if context.tokens is None or context.tokens.n_cells == 0:
            raise DataError(f"extractor {self.name!r} needs tokenized cells; add a tokenizer to the recipe.")
        if self.perturb_type == "overexpress" and context.tokens.values is not None:
            raise DataError(
                f"extractor {self.name!r}: perturb_type overexpress moves a gene to the front of a "
                f"rank-value sequence, but the tokens of model {model.name!r} carry expression values "
                "and their order means nothing to it. Use perturb_type: delete, or geneformer with the "
                "rank_value tokenizer."
            )
        return model

    def _layer(self, model: Any) -> int:
        if self.layer is not None:
            return self.layer
        return int(getattr(model, "embedding_layer", -1))

    def _state_column(self, context: RunContext, tokens: TokenizedCells) -> np.ndarray:
        key = self.state_key
        if key is None:
            raise DataError(
                f"extractor {self.name!r}: start_state {self.start_state!r} is given but no state_key; "
                "set params.state_key or data.cell_type_key to the obs column holding the states."
            )
        column = context.cell_column(tokens, key)
        if column is None:
            raise DataError(
                f"extractor {self.name!r}: state_key {key!r} is not carried with the tokens (they carry "
                f"{', '.join(map(str, tokens.obs.columns)) or 'no column'}) and the step has no data. Use a "
                "data role column: set data.cell_type_key (or data.label_key) to it."
            )
        return column.astype(str).to_numpy()

    def _states(
        self, context: RunContext, tokens: TokenizedCells, rng: np.random.Generator
    ) -> _States | None:
        if self.start_state is None:
            return None
        values = self._state_column(context, tokens)
        wanted = (
            [self.start_state] + ([self.goal_state] if self.goal_state is not None else []) + self.alt_states
        )
        found: dict[str, np.ndarray] = {}
        for state in wanted:
            cells = np.flatnonzero(values == str(state))
            if len(cells) == 0:
                present = ", ".join(map(repr, sorted(set(values))[:20]))
                raise DataError(
                    f"extractor {self.name!r}: no cell of the step has {self.state_key} == {state!r} "
                    f"(values: {present}). Check the state names and the step's cells."
                )
            if (
                state != self.start_state
                and self.max_state_cells is not None
                and len(cells) > self.max_state_cells
            ):
                cells = np.sort(rng.choice(cells, self.max_state_cells, replace=False))
            found[str(state)] = cells
        return _States(start=found.pop(str(self.start_state)), ends=found)

    def _listed_genes(self) -> list[str]:
        if isinstance(self.genes, list):
            return [str(g) for g in self.genes]
        return read_gene_list(self.genes, f"extractor {self.name!r} params.genes")

    def _targets(self, tokens: TokenizedCells, cells: np.ndarray, special: list[int]) -> _Targets:
        vocabulary = [str(name) for name in tokens.vocabulary]
        if not vocabulary:
            raise DataError(
                f"extractor {self.name!r}: the tokens carry no vocabulary, so genes cannot be named. "
                "Use a grnx tokenizer (it records token id -> gene id)."
            )
        size = max(len(vocabulary), int(np.max(tokens.input_ids)) + 1 if len(tokens.input_ids) else 1)
        lookup = np.full(size, -1, dtype=np.int64)
        if isinstance(self.genes, str) and self.genes == "all":
            present = token_universe(tokens, cells, special, n_genes=None, genes=None, who=self.name)
            lookup[present] = np.arange(len(present))
            return _Targets([vocabulary[i] for i in present], [np.array([i]) for i in present], lookup)
        names = self._listed_genes()
        position = {name: index for index, name in enumerate(vocabulary)}
        missing = [name for name in names if name not in position]
        if missing:
            raise DataError(
                f"extractor {self.name!r}: {len(missing)} of the {len(names)} genes to perturb are not in "
                f"the tokens' vocabulary (e.g. {', '.join(map(repr, missing[:5]))}). Use the tokens' gene "
                "ids (Ensembl ids for rank_value) or drop those genes."
            )
        ids = np.array([position[name] for name in names], dtype=np.int64)
        named_special = [names[i] for i, token in enumerate(ids) if token in set(special)]
        if named_special:
            raise DataError(f"extractor {self.name!r}: params.genes names special tokens {named_special}.")
        if self.group:
            return _Targets(["+".join(names)], [ids], None)
        lookup[ids] = np.arange(len(ids))
        return _Targets(names, [np.array([i]) for i in ids], lookup)

    def _cells_to_perturb(
        self, tokens: TokenizedCells, cells: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """Cells holding what a listed deletion deletes, capped at max_cells, longest first."""
        if self.perturb_type == "delete" and not (isinstance(self.genes, str) and self.genes == "all"):
            names = self._listed_genes()
            vocabulary = {str(name): i for i, name in enumerate(tokens.vocabulary)}
            wanted = np.array([vocabulary[n] for n in names if n in vocabulary], dtype=np.int64)
            holds = np.array(
                [
                    np.isin(wanted, tokens.cell(int(c))[0]).all()
                    if self.group
                    else np.isin(tokens.cell(int(c))[0], wanted).any()
                    for c in cells
                ],
                dtype=bool,
            )
            if not holds.any():
                which = "all of" if self.group else "any of"
                raise DataError(
                    f"extractor {self.name!r}: none of the {len(cells)} cells to perturb holds {which} "
                    f"the genes {names[:5]}, so there is nothing to delete."
                )
            cells = cells[holds]
        if self.max_cells is not None and len(cells) > self.max_cells:
            cells = np.sort(rng.choice(cells, self.max_cells, replace=False))
        # longest first, as Geneformer sorts them: similar lengths share a chunk
        return cells[np.argsort(-tokens.lengths[cells], kind="stable")]

    # -- embeddings --------------------------------------------------------------------------

    def _batches(self, model: Any, tokens: TokenizedCells, layer: int):
        autocast = None if self.precision == "float32" else self.precision
        return model.hidden_state_batches(
            tokens, layer=layer, batch_size=self.batch_size, autocast_dtype=autocast
        )

    def _cell_embeddings(
        self, model: Any, tokens: TokenizedCells, cells: np.ndarray, layer: int
    ) -> np.ndarray:
        subset = tokens.subset(cells)
        out: np.ndarray | None = None
        for rows, hidden, keep in self._batches(model, subset, layer):
            means = _masked_mean(hidden, keep).cpu().numpy()
            if out is None:
                out = np.zeros((len(cells), means.shape[1]))
            out[rows] = means
        assert out is not None
        return out

    def _state_embeddings(
        self, model: Any, tokens: TokenizedCells, states: _States | None, layer: int
    ) -> dict[str, np.ndarray]:
        if states is None:
            return {}
        return {
            name: self._cell_embeddings(model, tokens, cells, layer).mean(axis=0)
            for name, cells in states.ends.items()
        }

    # -- the perturbation loop -----------------------------------------------------------------

    def _max_length(self, tokens: TokenizedCells) -> int | None:
        for key in ("model_input_size", "max_length"):
            value = tokens.metadata.get(key)
            if value is not None:
                return int(value)
        return None

    def _null_requests(
        self,
        tokens: TokenizedCells,
        cells: np.ndarray,
        targets: _Targets,
        special: list[int],
        rng: np.random.Generator,
        null_owner: list[int],
    ) -> list[tuple[int, np.ndarray, int]]:
        """Random genes (groups of the tested size) of each cell, perturbed for the vs_null null."""
        requests = []
        excluded = targets.groups[0] if targets.lookup is None else np.zeros(0, dtype=np.int64)
        size = len(targets.groups[0]) if targets.lookup is None else 1
        for cell in cells:
            ids = np.unique(np.asarray(tokens.cell(int(cell))[0], dtype=np.int64))
            ids = ids[~np.isin(ids, special) & ~np.isin(ids, excluded)]
            n_draws = min(self.null_genes_per_cell, len(ids) // size)
            if n_draws == 0:
                continue
            drawn = rng.permutation(ids)[: n_draws * size].reshape(n_draws, size)
            for genes in drawn:
                owner = -1
                if targets.lookup is not None and genes[0] < len(targets.lookup):
                    owner = int(targets.lookup[genes[0]])
                # targets past the tested ones mark null copies
                requests.append((int(cell), genes, targets.n_targets + len(null_owner)))
                null_owner.append(owner)
        return requests

    def _chunks(self, tokens: TokenizedCells, cells: np.ndarray, targets: _Targets) -> list[np.ndarray]:
        if targets.lookup is None:  # a group: one copy per cell
            per_cell = np.ones(len(cells), dtype=np.int64)
        elif self.perturb_type == "overexpress" and self._is_list():  # every listed gene, present or not
            per_cell = np.full(len(cells), targets.n_targets, dtype=np.int64)
        else:  # the cell's genes that are targets
            per_cell = np.minimum(tokens.lengths[cells], targets.n_targets).astype(np.int64)
        if self.statistics == "vs_null":
            per_cell = per_cell + self.null_genes_per_cell
        budget = self.batch_size * _CHUNK_BATCHES
        chunks, start, running = [], 0, 0
        for index, count in enumerate(per_cell):
            running += int(count)
            if running >= budget:
                chunks.append(cells[start : index + 1])
                start, running = index + 1, 0
        if start < len(cells):
            chunks.append(cells[start:])
        return chunks

    def _is_list(self) -> bool:
        return not (isinstance(self.genes, str) and self.genes == "all")

    def _build(
        self,
        tokens: TokenizedCells,
        chunk: np.ndarray,
        targets: _Targets,
        special: list[int],
        null_requests: list[tuple[int, np.ndarray, int]],
    ) -> PerturbedBatch:
        builder = PerturbationBuilder(tokens)
        max_length = self._max_length(tokens)
        if targets.lookup is not None and (self.perturb_type == "delete" or not self._is_list()):
            each_present_gene(builder, chunk, self.perturb_type, special, targets.lookup)
        else:  # listed genes overexpressed (inserted where absent), or a group
            requests = [(int(c), group, t) for c in chunk for t, group in enumerate(targets.groups)]
            chosen_genes(builder, requests, self.perturb_type, special, max_length)
        chosen_genes(builder, null_requests, self.perturb_type, special, max_length)
        return builder.build()

    def _perturb(
        self,
        model: Any,
        tokens: TokenizedCells,
        cells: np.ndarray,
        targets: _Targets,
        special: list[int],
        layer: int,
        ends: dict[str, np.ndarray],
        rng: np.random.Generator,
    ) -> _Run:
        measures = list(ends) if ends else ["cell"]
        end_units = None
        if ends:
            stacked = np.stack([ends[name] for name in measures])
            end_units = stacked / np.linalg.norm(stacked, axis=1, keepdims=True)
        pairs = self._pairs(tokens, cells, targets, special)
        values: list[np.ndarray] = []
        owners: list[np.ndarray] = []
        null_owner: list[int] = []
        n_targets = targets.n_targets
        with progress(total=len(cells), desc=f"{self.name}: cells", unit="cell") as bar:
            for chunk in self._chunks(tokens, cells, targets):
                null_requests = (
                    self._null_requests(tokens, chunk, targets, special, rng, null_owner)
                    if self.statistics == "vs_null"
                    else []
                )
                batch = self._build(tokens, chunk, targets, special, null_requests)
                if batch.n_copies:
                    values.append(self._embed_copies(model, batch, layer, end_units, pairs))
                    owners.append(batch.target)
                bar.update(len(chunk))
        all_values = np.concatenate(values) if values else np.zeros((0, len(measures)))
        all_owners = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)
        if not np.all(np.isfinite(all_values)):
            raise DataError(
                f"extractor {self.name!r}: some embedding shifts are not finite; the model's hidden "
                "states hold NaN or zero vectors. Check that the model trained (a NaN loss gives this)."
            )
        tested = all_owners < n_targets
        null_index = all_owners[~tested] - n_targets
        return _Run(
            measures=measures,
            values=all_values[tested],
            target=all_owners[tested],
            null_values=all_values[~tested],
            null_owner=np.asarray(null_owner, dtype=np.int64)[null_index],
            pairs=pairs,
            n_cells=len(cells),
        )

    def _pairs(
        self, tokens: TokenizedCells, cells: np.ndarray, targets: _Targets, special: list[int]
    ) -> _PairShifts:
        """Empty gene-gene sums: rows the perturbed genes (or the group), columns the affected genes."""
        columns = token_universe(tokens, cells, special, n_genes=self.n_genes, genes=None, who=self.name)
        if targets.lookup is None:
            labels, row_of_target = [targets.labels[0]], np.zeros(1, dtype=np.int64)
        else:
            universe = set(columns.tolist())
            inside = [t for t, group in enumerate(targets.groups) if int(group[0]) in universe]
            labels = [targets.labels[t] for t in inside]
            row_of_target = np.full(targets.n_targets, -1, dtype=np.int64)
            row_of_target[inside] = np.arange(len(inside))
        needed = len(labels) * len(columns) * 40
        if needed > self.max_memory_gb * 2**30:
            raise DataError(
                f"extractor {self.name!r}: gene-gene shifts for {len(labels)} perturbed x {len(columns)} "
                f"affected genes need about {needed / 2**30:.1f} GB, over max_memory_gb="
                f"{self.max_memory_gb}. Set params.n_genes (e.g. 2000)."
            )
        size = max(int(np.max(tokens.input_ids)) + 1, len(tokens.vocabulary), 1)
        column_of = np.full(size, -1, dtype=np.int64)
        column_of[columns] = np.arange(len(columns))
        return _PairShifts(labels, columns, row_of_target, column_of, targets.n_targets)

    def _embed_copies(
        self,
        model: Any,
        batch: PerturbedBatch,
        layer: int,
        end_units: np.ndarray | None,
        pairs: _PairShifts,
    ) -> np.ndarray:
        """Embed the originals once, then every copy: the copies' measures; gene-gene shifts to ``pairs``."""
        import torch

        originals = batch.originals
        width = int(originals.lengths.max())
        original_states: Any = None
        original_cells: Any = None
        for rows, hidden, keep in self._batches(model, originals, layer):
            if original_states is None:
                original_states = hidden.new_zeros((originals.n_cells, width, hidden.shape[2]))
                original_cells = torch.zeros(
                    (originals.n_cells, hidden.shape[2]), dtype=torch.float64, device=hidden.device
                )
            at = torch.as_tensor(rows, device=hidden.device)
            original_states[at, : hidden.shape[1]] = hidden
            original_cells[at] = _masked_mean(hidden, keep)
        assert original_states is not None
        device = original_states.device
        ends = None if end_units is None else torch.as_tensor(end_units, device=device)
        out = np.zeros((batch.n_copies, 1 if ends is None else len(ends)))
        for rows, hidden, keep in self._batches(model, batch.perturbed, layer):
            compared = original_cells[torch.as_tensor(batch.compare_with[rows], device=device)]
            cell_embeddings = _masked_mean(hidden, keep)
            if ends is None:
                value = _one_minus_cosine(cell_embeddings, compared)[:, None]
            else:
                value = _unit(cell_embeddings) @ ends.T - _unit(compared) @ ends.T
            out[rows] = value.cpu().numpy()
            pairs.add(batch, rows, hidden, keep, original_states)
        return out

    # -- results -----------------------------------------------------------------------------

    def _table(self, run: _Run, targets: _Targets, seed: int) -> pd.DataFrame:
        with_states = run.measures != ["cell"]
        table = pd.DataFrame({"Gene": targets.labels})
        means = []
        for column in range(len(run.measures)):
            mean, counts = perturbation_stats.group_means(
                run.values[:, column], run.target, targets.n_targets
            )
            means.append(mean)
            if column == 0:
                table["N_Detections"] = counts
        shift_names = (
            ["Shift_to_goal_end"] + [f"Shift_to_alt_end_{s}" for s in run.measures[1:]]
            if with_states
            else ["Shift"]
        )
        for name, mean in zip(shift_names, means):
            table[name] = mean
        if not with_states:
            table["Cosine_sim_mean"] = 1.0 - means[0]
        sig_column = None
        if self.statistics != "none":
            if self.statistics == "vs_others":
                pool_values, pool_owner = run.values, run.target
            else:
                pool_values, pool_owner = run.null_values, run.null_owner
            if len(pool_values) == 0:
                raise DataError(
                    f"extractor {self.name!r}: the {self.statistics} null is empty (no perturbation to "
                    "compare with). Perturb more cells or genes, or use statistics: none."
                )
            sample = perturbation_stats.downsample(len(pool_values), self.null_size, seed)
            pool_values, pool_owner = pool_values[sample], pool_owner[sample]
            if with_states:
                pvalue_names = ["Goal_end_vs_random_pval"] + [
                    f"Alt_end_vs_random_pval_{s}" for s in run.measures[1:]
                ]
                fdr_names = ["Goal_end_FDR"] + [f"Alt_end_FDR_{s}" for s in run.measures[1:]]
            else:
                pvalue_names, fdr_names = ["Shift_vs_random_pval"], ["Shift_FDR"]
            for column, (pvalue_name, fdr_name) in enumerate(zip(pvalue_names, fdr_names)):
                _, pvalue, n_null = perturbation_stats.rank_sum_tests(
                    run.values[:, column], run.target, targets.n_targets, pool_values[:, column], pool_owner
                )
                table[pvalue_name] = pvalue
                table[fdr_name] = perturbation_stats.benjamini_hochberg(pvalue)
                if column == 0:
                    table["N_Null"] = n_null
            sig_column = fdr_names[0]
            table["Sig"] = (table[sig_column].to_numpy() < self.fdr_alpha).astype(np.int64)
        order_columns = [shift_names[0]]
        ascending = [False]
        if sig_column is not None:
            order_columns = ["Sig", shift_names[0], sig_column]
            ascending = [False, False, True]
        table = table.sort_values(order_columns, ascending=ascending, kind="mergesort", na_position="last")
        leading = ["Gene", *shift_names] + (["Cosine_sim_mean"] if not with_states else [])
        rest = [c for c in table.columns if c not in leading]
        return table[leading + rest].reset_index(drop=True)

    def _interactions(self, run: _Run, tokens: TokenizedCells, metadata: dict[str, Any]) -> Interactions:
        pairs = run.pairs
        sums, pair_counts = pairs.totals()
        row_index, column_index = np.nonzero(pair_counts >= self.min_detections)
        if len(row_index) == 0:
            raise DataError(
                f"extractor {self.name!r}: no gene-gene pair was seen in {self.min_detections} or more "
                f"perturbed cells. Lower params.min_detections, perturb more cells, or check params.n_genes."
            )
        counts = pair_counts[row_index, column_index]
        score = sums[row_index, column_index] / counts
        names = np.asarray([str(tokens.vocabulary[i]) for i in pairs.columns], dtype=object)
        table = pd.DataFrame(
            {
                "source": np.asarray(pairs.labels, dtype=object)[row_index],
                "target": names[column_index],
                "score": score,
                "n_detections": counts.astype(np.int64),
            }
        )
        interactions = Interactions(
            table,
            directed=True,
            extractor=self.name,
            genes=sorted(set(pairs.labels) | set(names.tolist())),
            metadata=metadata,
        )
        return interactions if self.top_k is None else interactions.top(self.top_k)

    def _tag(self, context: RunContext) -> str:
        """Name of the step's artifacts: the step id when the runner gives it, else what was perturbed
        toward what plus a digest of the params (two steps of one run never share a name)."""
        step = context.extras.get("step_id")
        if step is None:
            parts = [self.perturb_type, "all" if self.start_state is None else str(self.start_state)]
            if self.goal_state is not None:
                parts.append(f"to_{self.goal_state}")
            if self.alt_states:
                parts.append("alt")
            digest = hashlib.sha256(json.dumps(self.get_params(), sort_keys=True, default=str).encode())
            step = "_".join(parts) + "-" + digest.hexdigest()[:8]
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(step))

    def _log(self, context: RunContext, table: pd.DataFrame, tag: str, run: _Run) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / f"{tag}.parquet"
            table.to_parquet(path, index=False)
            context.logger.log_artifact(path, "perturbation")
        shift_column = table.columns[1]
        fdr_column = next((c for c in ("Goal_end_FDR", "Shift_FDR") if c in table.columns), None)
        context.logger.log_figure(
            f"perturbation/{tag}_shifts.png", shift_plot(table, shift_column, fdr_column, self.fdr_alpha, tag)
        )
        metrics = {
            f"perturbation/{tag}/n_cells": float(run.n_cells),
            f"perturbation/{tag}/n_perturbations": float(len(run.values)),
            f"perturbation/{tag}/n_genes": float(int((table["N_Detections"] > 0).sum())),
        }
        if "Sig" in table.columns:
            metrics[f"perturbation/{tag}/n_significant"] = float(table["Sig"].sum())
        context.logger.log_metrics(metrics)

    def extract(self, context: RunContext) -> Interactions:
        with torch_threads(context):  # execution.num_threads / GRNX_NUM_THREADS, as for training
            return self._extract(context)

    def _extract(self, context: RunContext) -> Interactions:
        from grnx_core.recipe import derive_seed

        model = self._model(context)
        tokens = context.tokens
        special = sorted(int(i) for i in model.token_info_.get("special_ids", []))
        seed = self.seed if self.seed is not None else derive_seed(context.seed, f"extractors/{self.name}")
        rng = np.random.default_rng(seed)
        states = self._states(context, tokens, rng)
        cells = states.start if states is not None else np.arange(tokens.n_cells)
        cells = self._cells_to_perturb(tokens, cells, rng)
        targets = self._targets(tokens, cells, special)
        layer = self._layer(model)
        ends = self._state_embeddings(model, tokens, states, layer)
        run = self._perturb(model, tokens, cells, targets, special, layer, ends, rng)
        if len(run.values) == 0:
            raise DataError(
                f"extractor {self.name!r}: no perturbation changed any of the {len(cells)} cells (e.g. "
                "every overexpressed gene was already first). Perturb other genes or cells."
            )
        table = self._table(run, targets, seed)
        tag = self._tag(context)
        self._log(context, table, tag, run)
        top = table.head(20).replace({np.nan: None}).to_dict(orient="records")
        metadata = {
            "perturb_type": self.perturb_type,
            "genes": "all" if not self._is_list() else ("group" if self.group else "list"),
            "layer": layer,
            "state_key": self.state_key if states is not None else None,
            "start_state": self.start_state,
            "goal_state": self.goal_state,
            "alt_states": list(self.alt_states),
            "statistics": self.statistics,
            "n_cells": int(run.n_cells),
            "n_perturbations": int(len(run.values)),
            "table_artifact": f"perturbation/{tag}.parquet",
            "top_genes": [
                {k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()} for r in top
            ],
            "model": getattr(model, "name", type(model).__name__),
        }
        return self._interactions(run, tokens, metadata)
