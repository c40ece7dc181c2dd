"""Gene-gene interactions from a transformer's attention maps, aggregated over (weighted) cells."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from grnx_core import DataError, Extractor, GrnxError, Interactions, RunContext, TokenizedCells
from grnx_core.components import AttentionModel
from grnx_core.progress import progress
from grnx_core.threads import thread_count, torch_threads
from grnx_plugins.extractors._attention_chunks import sums_on_ray, uses_ray
from grnx_plugins.extractors._universe import UniverseParams, universe_file, universe_indices


def cell_weights(context: RunContext, weighting: str, who: str) -> np.ndarray:
    """Per-cell weights of ``context.tokens``: the sampler's (WDS inverse density) or all 1."""
    n_cells = context.tokens.n_cells
    if weighting == "uniform" or context.sample is None:
        return np.ones(n_cells)
    weights = np.asarray(context.sample.weights, dtype=np.float64)
    if len(weights) != n_cells:
        raise DataError(
            f"extractor {who!r}: the sample has {len(weights)} weights but the tokens hold "
            f"{n_cells} cells; the tokens must be the sampled cells in sample order."
        )
    return weights


def token_universe(
    tokens: TokenizedCells,
    cells: np.ndarray,
    special_ids: list[int],
    *,
    n_genes: int | None,
    genes: list[str] | str | None,
    who: str,
) -> np.ndarray:
    """Token ids (sorted) of the genes a token extractor's pairs span.

    ``genes`` (an explicit universe of gene ids, mapped through the tokens' vocabulary) overrides
    the rule: the genes present in ``cells``, or the ``n_genes`` present in most of them (ties:
    the smaller token id). Special tokens are never genes.
    """
    where = f"extractor {who!r}"
    if genes is not None:
        ids = universe_indices(genes, [str(name) for name in tokens.vocabulary], where)
        named_special = [str(tokens.vocabulary[i]) for i in ids[np.isin(ids, special_ids)]]
        if named_special:
            raise DataError(
                f"{where}: params.genes names special tokens ({', '.join(map(repr, named_special[:5]))}), "
                "which are not genes; list gene ids only."
            )
        return ids.astype(np.int64)
    cells = np.asarray(cells, dtype=np.int64)
    lengths = tokens.lengths[cells]
    gather = (
        np.concatenate([np.arange(tokens.offsets[c], tokens.offsets[c + 1]) for c in cells])
        if len(cells)
        else np.zeros(0, dtype=np.int64)
    )
    ids = np.asarray(tokens.input_ids[gather], dtype=np.int64)
    # each (cell, gene) once, so counts are numbers of cells
    cell_of = np.repeat(np.arange(len(cells), dtype=np.int64), lengths)
    width = int(ids.max()) + 1 if len(ids) else 1
    present = np.unique(cell_of * width + ids) % width
    ids, counts = np.unique(present, return_counts=True)
    keep = ~np.isin(ids, special_ids)
    ids, counts = ids[keep], counts[keep]
    if n_genes is not None and n_genes < len(ids):
        ids = np.sort(ids[np.argsort(-counts, kind="stable")[:n_genes]])
    return ids.astype(np.int64)


def keep_most_expressed(tokens: TokenizedCells, max_length: int, special_ids: list[int]) -> TokenizedCells:
    """Each cell cut to ``max_length`` tokens: its special tokens and its most expressed genes.

    With values (expression-scaled, binned tokens) the genes with the highest values are kept
    (ties: the earlier token); without values (rank-value tokens, written most expressed first)
    the first genes. Kept tokens stay in their order, so positional models see a prefix-like cell.
    """
    lengths = tokens.lengths
    long_cells = np.flatnonzero(lengths > max_length)
    if not len(long_cells):
        return tokens
    keep = np.ones(len(tokens.input_ids), dtype=bool)
    for cell in long_cells:
        start, stop = int(tokens.offsets[cell]), int(tokens.offsets[cell + 1])
        special = np.isin(tokens.input_ids[start:stop], special_ids)
        n_kept_genes = max_length - int(special.sum())
        if n_kept_genes < 1:
            raise DataError(
                f"extractor 'attention': max_length={max_length} leaves no gene in cell "
                f"{str(tokens.obs.index[cell])!r} after its {int(special.sum())} special tokens; "
                "raise max_length."
            )
        gene_positions = np.flatnonzero(~special)
        if tokens.values is None:
            chosen = gene_positions[:n_kept_genes]
        else:
            values = np.asarray(tokens.values[start:stop])[gene_positions]
            chosen = gene_positions[np.argsort(-values, kind="stable")[:n_kept_genes]]
        kept = special.copy()
        kept[chosen] = True
        keep[start:stop] = kept
    new_lengths = np.minimum(lengths, max_length)
    return TokenizedCells(
        input_ids=np.asarray(tokens.input_ids)[keep],
        offsets=np.concatenate([[0], np.cumsum(new_lengths)]),
        obs=tokens.obs,
        values=None if tokens.values is None else np.asarray(tokens.values)[keep],
        vocabulary=tokens.vocabulary,
        metadata=dict(tokens.metadata),
    )


def remove_gene_means(score: np.ndarray, how: str, where: str) -> np.ndarray:
    """Remove each gene's average score from a gene x gene matrix (NaN entries: pairs not scored).

    Means are over the finite off-diagonal entries: ``r[a]`` of row a, ``c[b]`` of column b,
    ``s`` of all. ``apc``: ``S - r[a] c[b] / s``, the average product correction of Dunn, Wahl
    and Gloor (Bioinformatics 2008, doi:10.1093/bioinformatics/btm604), which removes the part
    of a pair's score explained by how much each gene scores with everyone. ``center``:
    ``S - r[a] - c[b] + s``, double centring (exactly zero row and column means when no entry is
    missing).
    """
    finite = np.isfinite(score)
    np.fill_diagonal(finite, False)
    values = np.where(finite, score, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        row_mean = values.sum(axis=1) / finite.sum(axis=1)
        column_mean = values.sum(axis=0) / finite.sum(axis=0)
    overall = float(values.sum() / max(int(finite.sum()), 1))
    if how == "apc":
        if not overall > 0:
            raise DataError(
                f"{where}: normalize 'apc' divides by the mean score, which is {overall:.3g}; it needs "
                "positive scores (attention). Use normalize 'center' or 'none'."
            )
        corrected = score - np.outer(row_mean, column_mean) / overall
    else:
        corrected = score - row_mean[:, None] - column_mean[None, :] + overall
    corrected[~finite] = np.nan
    return corrected


class AttentionExtractor(Extractor):
    """Weighted attention aggregation (Wu et al., NeurIPS 2024, section 3; docs/methods/extractors.md#attention).

    For every cell ``c`` the model gives ``E_c``, its attention over its genes averaged over the
    chosen ``layers`` and ``heads`` (each layer from its own input; negative indices count from
    the end). With the diagonal removed, for every ordered pair (a, b) of genes present in the
    cell: ``Z[a, b] += w_c * E_c[a, b]`` and ``M[a, b] += w_c``; the score is ``Z / M`` (float64),
    symmetrised for undirected output, and pairs never seen together are dropped. ``w_c`` is the
    sampler's weight of the cell (WDS: the inverse-density weight) or 1 (``weighting: uniform``,
    or when no sampler ran). Variants: ``all`` cells, ``case`` cells only (``group_key == case``),
    ``case_minus_control`` (score over case cells minus score over control cells, for the pairs
    seen in both groups; control = the ``control`` value, or every other labelled cell when None).

    A gene's mean attention follows its mean expression, so the raw score ranks expression hubs
    first. ``normalize`` removes each gene's average score from the (symmetrised) score matrix
    of each group before any difference: ``apc``, the average product correction of protein
    contact prediction (Dunn, Wahl and Gloor 2008), or ``center`` (double centring); ``none`` is
    the paper's score. ``rank_by: abs`` ranks by magnitude and keeps the sign (the default for
    ``case_minus_control``, whose sign says which group attends more), ``value`` by the score.

    ``max_length`` keeps each cell's special tokens and its most expressed genes: the highest
    token values (expression-scaled, binned tokens; ties: the earlier token), or the first genes
    of rank-value tokens, which are written most expressed first.

    The matrices span only the gene universe (``genes``: an explicit list or file of gene ids;
    else the genes present in the cells used, or the ``n_genes`` most frequent of them), never
    the whole vocabulary. Gene names come from the tokens' vocabulary (token id -> gene id).
    Reads ``context.model`` (a model with ``attention``, e.g. celluformer, geneformer, scgpt),
    ``context.tokens`` and ``context.sample``.

    Scale-out: with ``execution.num_workers`` > 1 or ``execution.ray_address`` the cells are split
    into chunks whose Z and M are Ray tasks (the model sent as its ``save()`` folder, run on CPU);
    the driver adds the partial sums in chunk order in float64 and normalises once, so the result
    is the in-process one up to float rounding (``_attention_chunks``).
    """

    name = "attention"
    description = "Gene pairs ranked by attention aggregated over cells: Z/M with per-cell (WDS) weights."
    reference = "https://arxiv.org/abs/2410.15616"
    needs: ClassVar[tuple[str, ...]] = ("tokens", "model", "cells")

    class Params(UniverseParams):
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
        heads: list[int] | None = Field(
            None, description="heads to average (negative from the end); all when None"
        )
        directed: bool = Field(False, description="keep A[a,b] and A[b,a] apart; undirected symmetrises")
        normalize: Literal["none", "apc", "center"] = Field(
            "none",
            description="remove each gene's average score: none (the paper), apc (average product "
            "correction, Dunn et al. 2008) or center (double centring)",
        )
        rank_by: Literal["abs", "value"] | None = Field(
            None,
            description="rank by |score| (sign kept) or by score; None: abs for case_minus_control, else value",
        )
        n_genes: int | None = Field(
            None,
            ge=2,
            description="gene universe: the genes present in most cells; all present genes when None",
        )
        batch_size: int = Field(8, ge=1, description="cells per forward pass")
        max_length: int | None = Field(
            None,
            ge=2,
            description="keep each cell's special tokens and most expressed genes, this many in all",
        )
        top_k: int | None = Field(None, ge=1, description="keep only the best pairs; all pairs when None")
        max_memory_gb: float = Field(
            8.0, gt=0, description="refuse gene universes whose matrices exceed this"
        )

    def output_direction(self) -> str:
        # A[a, b]: the attention query gene a pays to key gene b; not a regulatory claim.
        return "query -> key (attention from source to target)" if self.directed else "undirected"

    def input_files(self) -> list[Path]:
        return universe_file(self.genes)

    def ranking(self) -> str:
        """How pairs are ranked: ``rank_by``, or its default for the variant."""
        if self.rank_by is not None:
            return self.rank_by
        return "abs" if self.variant == "case_minus_control" else "value"

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
        return cell_weights(context, self.weighting, self.name)

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

    @staticmethod
    def _special_ids(model: Any) -> list[int]:
        return [int(i) for i in getattr(model, "token_info_", {}).get("special_ids", [])]

    def _tokens(self, model: Any, context: RunContext) -> TokenizedCells:
        """The tokens the maps are computed from: each cell cut to its most expressed genes."""
        if self.max_length is None:
            return context.tokens
        return keep_most_expressed(context.tokens, self.max_length, self._special_ids(model))

    def _universe(
        self, model: Any, context: RunContext, cells: np.ndarray, tokens: TokenizedCells | None = None
    ) -> np.ndarray:
        """Token ids of the genes the matrices span (sorted), excluding special tokens."""
        return token_universe(
            tokens if tokens is not None else self._tokens(model, context),
            cells,
            self._special_ids(model),
            n_genes=self.n_genes,
            genes=self.genes,
            who=self.name,
        )

    # -- aggregation -------------------------------------------------------------------------

    def _open_maps(self, model: Any, tokens: TokenizedCells, cells: np.ndarray) -> tuple[Any, Any]:
        """The model's first map and the rest, with a bad layer or head selection reported as this
        step's error."""
        maps = model.attention(
            tokens, cells=cells, layers=self.layers, heads=self.heads, batch_size=self.batch_size
        )
        try:
            first = next(maps, None)
        except GrnxError as error:
            if isinstance(error, DataError):
                raise
            raise DataError(
                f"extractor 'attention': params.layers={self.layers}, params.heads={self.heads} do not "
                f"fit the model: {error} Negative indices count from the end (-1: the last)."
            ) from None
        return first, maps

    def _maps(self, model: Any, tokens: TokenizedCells, cells: np.ndarray) -> Any:
        """The model's maps, one per cell, with a progress bar."""
        first, maps = self._open_maps(model, tokens, cells)
        if first is None:
            return
        with progress(total=len(cells), desc="extractor 'attention': attention maps", unit="cell") as bar:
            yield first
            bar.update(1)
            for cell_map in maps:
                yield cell_map
                bar.update(1)

    def aggregate(
        self,
        model: Any,
        context: RunContext,
        cells: np.ndarray,
        weights: np.ndarray,
        universe: np.ndarray,
        tokens: TokenizedCells | None = None,
        *,
        cell_rows: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(Z, M) over ``universe`` for ``cells``: Z[a,b] = sum_c w_c E_c[a,b], M[a,b] = sum_c w_c.

        In this process, cell after cell in the model's batch order. ``cell_rows``: the rows of
        ``tokens``' cells in the run's tokens (a Ray chunk holds a subset), for messages.
        """
        tokens = tokens if tokens is not None else self._tokens(model, context)
        n_genes = len(universe)
        lookup = np.full(int(universe.max()) + 1 if n_genes else 1, -1, dtype=np.int64)
        lookup[universe] = np.arange(n_genes)
        z = np.zeros((n_genes, n_genes))
        m = np.zeros((n_genes, n_genes))
        for cell_map in self._maps(model, tokens, cells):
            ids = cell_map.token_ids.astype(np.int64)
            positions = np.where(ids < len(lookup), lookup[np.minimum(ids, len(lookup) - 1)], -1)
            inside = positions >= 0
            index = positions[inside]
            if len(index) < 2:
                continue
            weight = float(weights[cell_map.cell])
            attention = cell_map.attention[np.ix_(inside, inside)] if not inside.all() else cell_map.attention
            if not np.isfinite(attention).all():
                name = str(tokens.obs.index[cell_map.cell])
                row = cell_map.cell if cell_rows is None else int(cell_rows[cell_map.cell])
                raise DataError(
                    f"extractor 'attention': the model's attention over cell {name!r} (row {row}) "
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

    def _sums(
        self,
        model: Any,
        context: RunContext,
        groups: list[np.ndarray],
        weights: np.ndarray,
        universe: np.ndarray,
        tokens: TokenizedCells,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """(Z, M) of each group: in this process, or over chunks of cells on Ray when
        ``execution.num_workers`` > 1 or ``execution.ray_address`` is set."""
        execute = context.execute
        if not uses_ray(execute.num_workers, execute.ray_address):
            return [self.aggregate(model, context, cells, weights, universe, tokens) for cells in groups]
        # One map here, from the shortest cell: a bad layer or head selection is this step's error
        # before any worker starts.
        cells = np.concatenate(groups)
        self._open_maps(model, tokens, cells[np.argmin(tokens.lengths[cells])][None])
        return sums_on_ray(
            self,
            model,
            tokens,
            groups,
            weights,
            universe,
            num_workers=execute.num_workers,
            ray_address=execute.ray_address,
            threads=thread_count(context),
        )

    def score(self, z: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Z / M (symmetrised when undirected), then ``normalize``; NaN where M is 0."""
        if not self.directed:
            z, m = z + z.T, m + m.T
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.where(m > 0, z / np.where(m > 0, m, 1.0), np.nan)
        np.fill_diagonal(score, np.nan)
        if self.normalize != "none":
            score = remove_gene_means(score, self.normalize, "extractor 'attention'")
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
        with torch_threads(context):  # execution.num_threads / GRNX_NUM_THREADS, as for training
            return self._extract(context)

    def _extract(self, context: RunContext) -> Interactions:
        model = self._model(context)
        weights = self._weights(context)
        groups = self._groups(context)
        tokens = self._tokens(model, context)
        universe = self._universe(model, context, np.concatenate(groups), tokens)
        n_genes = len(universe)
        if n_genes < 2:
            raise DataError(f"extractor 'attention': only {n_genes} gene(s) in the cells; need 2 or more.")
        needed = n_genes**2 * (16 + 8 * len(groups)) + (0 if self.top_k else n_genes**2 * 24)
        if uses_ray(context.execute.num_workers, context.execute.ray_address):
            needed += n_genes**2 * 16  # a chunk's partial sums, on their way into the total
        if needed > self.max_memory_gb * 2**30:
            raise DataError(
                f"extractor 'attention': {n_genes} genes need about {needed / 2**30:.1f} GB, over "
                f"max_memory_gb={self.max_memory_gb}. Set params.n_genes (e.g. 5000) and/or params.top_k."
            )
        vocabulary = tokens.vocabulary
        if not vocabulary or int(universe.max()) >= len(vocabulary):
            raise DataError(
                "extractor 'attention': the tokens carry no vocabulary for their ids, so genes cannot "
                "be named. Use a grnx tokenizer (it records token id -> gene id)."
            )
        genes = [str(vocabulary[i]) for i in universe]
        # normalisation (in score) runs on whole sums, wherever the sums were computed
        scores = [self.score(z, m) for z, m in self._sums(model, context, groups, weights, universe, tokens)]
        score = scores[0] if len(scores) == 1 else scores[0] - scores[1]
        self._require_scored_pairs(score, groups)
        metadata = {
            "variant": self.variant,
            "weighting": self.weighting if context.sample is not None else "uniform",
            "normalize": self.normalize,
            "rank_by": self.ranking(),
            "n_cells": int(sum(len(c) for c in groups)),
            "n_genes": n_genes,
            "model": getattr(model, "name", type(model).__name__),
        }
        return Interactions.from_matrix(
            score,
            genes,
            directed=self.directed,
            extractor=self.name,
            rank_by=self.ranking(),
            top_k=self.top_k,
            metadata=metadata,
        )
