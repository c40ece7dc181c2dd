"""Pairwise Neural Interaction Detection (NID) from the weights of a trained MLP."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from grnx_core import DataError, Extractor, Interactions, RunContext
from grnx_plugins.extractors._universe import UniverseParams, universe_file, universe_indices

#: Peak bytes per kept pair: position and score while scanning, their sorted copies, then the
#: table's gene-name references and score and the copies Interactions makes while sorting
#: (tracemalloc peak / pairs: 136 for all pairs of 2,000 genes, 121 for the top 100,000).
_BYTES_PER_KEPT_PAIR = 144


def aggregated_influence(
    weights: Sequence[np.ndarray], output_index: int | None = None, dtype: Any = np.float64
) -> np.ndarray:
    """``z = |w_y|^T |W_L| ... |W_2|``: each first-layer unit's influence on the output (length h1).

    ``weights`` is ``[W1, W2, ..., W_out]``, each (out x in); biases are not part of it (NID
    ignores them). The rows of ``W_out`` (one per class) are summed unless ``output_index``
    picks one.
    """
    later = np.abs(np.asarray(weights[-1], dtype=dtype))
    if output_index is not None:
        later = later[output_index : output_index + 1]
    for matrix in reversed(weights[1:-1]):
        later = later @ np.abs(np.asarray(matrix, dtype=dtype))
    return later.sum(axis=0)


def pair_strength_tiles(
    first_layer: np.ndarray, influence: np.ndarray, tile_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``omega(i, j) = sum_s z_s * min(|W1[s, i]|, |W1[s, j]|)`` for i < j, one tile of genes at a time.

    ``first_layer`` is W1 (h1 x p) and ``influence`` is z (h1), both in the working dtype. Yields
    ``(rows, cols, omega)`` per tile (flat arrays, rows < cols, row-major within the tile); the
    working set is ``tile_size**2 * h1`` values, whatever the number of genes.
    """
    per_gene = np.ascontiguousarray(np.abs(first_layer).T)  # p x h1
    n_genes = len(per_gene)
    for row_start in range(0, n_genes, tile_size):
        rows = per_gene[row_start : row_start + tile_size]
        for col_start in range(row_start, n_genes, tile_size):
            cols = per_gene[col_start : col_start + tile_size]
            omega = np.minimum(rows[:, None, :], cols[None, :, :]) @ influence
            row_index = np.arange(row_start, row_start + len(rows))[:, None]
            col_index = np.arange(col_start, col_start + len(cols))[None, :]
            upper = np.broadcast_to(row_index < col_index, omega.shape)
            yield (
                np.broadcast_to(row_index, omega.shape)[upper],
                np.broadcast_to(col_index, omega.shape)[upper],
                omega[upper],
            )


def _best(positions: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k highest scores; ties at the k-th score go to the earliest positions (matrix order)."""
    if len(scores) <= k:
        return positions, scores
    kth = np.partition(scores, len(scores) - k)[len(scores) - k]
    above = np.flatnonzero(scores > kth)
    tied = np.flatnonzero(scores == kth)
    tied = tied[np.argsort(positions[tied], kind="stable")[: k - len(above)]]
    keep = np.concatenate([above, tied])
    return positions[keep], scores[keep]


class NIDExtractor(Extractor):
    """Pairwise NID (Tsang, Cheng, Liu, ICLR 2018, section 4; docs/methods/extractors.md#nid).

    From an ``mlp`` model's weights ``[W1 (h1 x p), W2, ..., W_out]``, biases ignored:
    ``z = |w_y|^T |W_L| ... |W_2|`` (the rows of ``W_out`` summed over classes, or the row of
    ``output_class``), then for every pair i < j of the model's input genes
    ``omega(i, j) = sum_s z_s * min(|W1[s, i]|, |W1[s, j]|)``. Pairs are ranked by omega
    (non-negative, undirected). The model's gene order gives i < j; ``genes:`` restricts the pairs
    to a universe of its input genes (omega of a pair depends only on its two columns of W1).

    Computed in square tiles of ``tile_size`` genes (``tile_size**2 * h1`` values at a time), in
    float64 or float32, never float16 (ties would reorder the top pairs); with ``top_k`` only the
    best pairs are kept while scanning, so memory does not grow with p^2. Cost: p^2 * h1 / 2
    (2,000 genes x 128 units on one shared core: 0.5 s for the scan, 7 s with every pair's table,
    2.4 s with top_k 10,000).

    The weights are those the model applies to its inputs: with ``standardize: true`` they weigh
    z-scored genes, otherwise raw values, whose scale then enters omega. A model trained to tell
    disease from control cells gives genes that interact *in that decision*, not a regulatory
    network.

    Reference code (github.com/mtsang/neural-interaction-detection, ``neural_interaction_detection.py``):
    ``preprocess_weights`` forms the same z and ``interpret_pairwise_interactions`` the same omega,
    with ``min`` as the averaging function, pairs 0-indexed with i < j. Where it departs from the
    paper: the paper defines z for one output, the code sums over the rows of ``W_out`` of a
    multi-output model (done here by default; ``output_class`` takes one row); its MLP has a bias
    in every layer, the first included, which NID then ignores (grnx's ``mlp`` has no first-layer
    bias); and the univariate main-effect networks of the paper's MLP-M are left out of z. grnx's
    ``mlp`` uses Softplus where the paper and the code use ReLU; NID reads weights only.
    """

    name = "nid"
    description = "Gene pairs ranked by Neural Interaction Detection on a trained MLP's weights."
    reference = "https://openreview.net/forum?id=ByOfBggRZ"
    needs: ClassVar[tuple[str, ...]] = ("model",)

    class Params(UniverseParams):
        output_class: str | int | None = Field(
            None,
            description="class (a value of the model's label) whose output weights give z; "
            "None sums over all classes, as the reference code does",
        )
        precision: Literal["float64", "float32"] = Field(
            "float64", description="working precision of z and omega (float16 is refused: ties)"
        )
        tile_size: int = Field(
            64, ge=1, description="genes per side of a tile; a tile holds tile_size^2 * h1 values"
        )
        top_k: int | None = Field(None, ge=1, description="keep only the best pairs; all pairs when None")
        max_memory_gb: float = Field(
            8.0, gt=0, description="refuse a tile plus kept pairs that would need more than this"
        )

    genes: list[str] | str | None
    output_class: str | int | None
    precision: str
    tile_size: int
    top_k: int | None
    max_memory_gb: float

    def input_files(self) -> list[Path]:
        return universe_file(self.genes)

    # -- inputs ------------------------------------------------------------------------------

    def _weights(self, context: RunContext) -> tuple[list[np.ndarray], list[str], list[Any]]:
        """The model's weight matrices, its input genes and its classes, checked for consistency."""
        model = context.model
        weight_matrices = getattr(model, "weight_matrices", None)
        genes = getattr(model, "genes_", None)
        if model is None or not callable(weight_matrices) or genes is None:
            found = "no model" if model is None else f"model {getattr(model, 'name', type(model).__name__)!r}"
            raise DataError(
                f"extractor 'nid' reads the weights of a trained MLP (model 'mlp'); the run has {found}. "
                "Add `model: {name: mlp}` to the recipe (NID needs no tokenizer)."
            )
        weights = [np.asarray(matrix) for matrix in weight_matrices()]
        genes = [str(gene) for gene in genes]
        if len(weights) < 2 or weights[0].shape[1] != len(genes):
            shapes = ", ".join(str(matrix.shape) for matrix in weights)
            raise DataError(
                f"extractor 'nid': the model's weights ({shapes}) do not form an MLP over its "
                f"{len(genes)} input genes; expected [W1 (h1 x {len(genes)}), ..., W_out]."
            )
        for depth, (inner, outer) in enumerate(zip(weights[:-1], weights[1:]), start=1):
            if outer.shape[1] != inner.shape[0]:
                raise DataError(
                    f"extractor 'nid': weight matrix {depth + 1} has {outer.shape[1]} inputs but layer "
                    f"{depth} has {inner.shape[0]} units; the model's weight_matrices() are inconsistent."
                )
        for depth, matrix in enumerate(weights, start=1):
            if not np.isfinite(matrix).all():
                raise DataError(
                    f"extractor 'nid': weight matrix {depth} of the model holds NaN or inf, so training "
                    "diverged. Train it again with a lower train.learning_rate (and train.max_grad_norm "
                    "set), from inputs without NaN (standardize: true helps with raw counts)."
                )
        return weights, genes, list(getattr(model, "classes_", []) or [])

    def _output_index(self, classes: list[Any], n_outputs: int) -> int | None:
        if self.output_class is None:
            return None
        names = [str(value) for value in classes]
        if str(self.output_class) not in names:
            listed = ", ".join(map(repr, names[:10])) or "none recorded"
            raise DataError(
                f"extractor 'nid': params.output_class {self.output_class!r} is not a class of the model "
                f"(classes: {listed}). Use one of them, or null to sum over all {n_outputs} outputs."
            )
        index = names.index(str(self.output_class))
        if index >= n_outputs:
            raise DataError(
                f"extractor 'nid': the model lists {len(names)} classes but has {n_outputs} outputs; "
                "its classes do not match its output layer."
            )
        return index

    def _require_memory(self, n_genes: int, n_hidden: int, itemsize: int) -> None:
        n_pairs = n_genes * (n_genes - 1) // 2
        kept = n_pairs if self.top_k is None else min(self.top_k, n_pairs)
        tile = min(self.tile_size, n_genes)
        # the broadcast minimum and the scanned tile's entries next to the pairs kept so far
        needed = tile * tile * n_hidden * itemsize + (kept + tile * tile) * _BYTES_PER_KEPT_PAIR
        if needed > self.max_memory_gb * 2**30:
            raise DataError(
                f"extractor 'nid': {n_genes} genes with {n_hidden} first-layer units need about "
                f"{needed / 2**30:.1f} GB (tiles of {tile} genes, {kept} pairs kept), over "
                f"max_memory_gb={self.max_memory_gb}. Set params.top_k (e.g. 100000), a smaller "
                "params.tile_size, or a smaller gene universe (params.genes)."
            )

    # -- extraction --------------------------------------------------------------------------

    def extract(self, context: RunContext) -> Interactions:
        weights, genes, classes = self._weights(context)
        output_index = self._output_index(classes, weights[-1].shape[0])
        where = f"extractor 'nid' (the model's {len(genes)} input genes)"
        chosen = universe_indices(self.genes, genes, where)
        first_layer = weights[0] if chosen is None else weights[0][:, chosen]
        genes = genes if chosen is None else [genes[i] for i in chosen]
        n_genes, n_hidden = len(genes), first_layer.shape[0]
        if n_genes < 2:
            raise DataError(f"extractor 'nid': the model has {n_genes} input gene(s); pairs need 2 or more.")
        dtype = np.dtype(self.precision)
        self._require_memory(n_genes, n_hidden, dtype.itemsize)
        influence = aggregated_influence(weights, output_index, dtype)
        positions, scores = np.zeros(0, np.int64), np.zeros(0, dtype)
        kept_positions, kept_scores = [positions], [scores]
        for rows, cols, omega in pair_strength_tiles(first_layer.astype(dtype), influence, self.tile_size):
            tile_positions = rows.astype(np.int64) * n_genes + cols
            if self.top_k is None:
                kept_positions.append(tile_positions)
                kept_scores.append(omega)
            else:
                positions, scores = _best(
                    np.concatenate([positions, tile_positions]), np.concatenate([scores, omega]), self.top_k
                )
        if self.top_k is None:
            positions, scores = np.concatenate(kept_positions), np.concatenate(kept_scores)
        if not np.any(scores):
            raise DataError(
                f"extractor 'nid': every pair of the {n_genes} genes scores 0 (the first layer's weights "
                "or the influence z of its units are all 0), so the ranking would be arbitrary. "
                "Train the model longer or with a smaller l1."
            )
        # matrix order before the stable sort by score, so ties rank as Interactions.from_matrix does
        order = np.argsort(positions, kind="stable")
        positions, scores = positions[order], scores[order]
        names = np.asarray(genes, dtype=object)
        table = pd.DataFrame(
            {
                "source": names[positions // n_genes],
                "target": names[positions % n_genes],
                "score": scores.astype(np.float64),
            }
        )
        metadata = {
            "model": getattr(context.model, "name", type(context.model).__name__),
            "n_genes": n_genes,
            "n_hidden_units": int(n_hidden),
            "n_weight_matrices": len(weights),
            "output_class": "all classes summed" if output_index is None else str(classes[output_index]),
            "precision": self.precision,
        }
        return Interactions(table, directed=False, extractor=self.name, genes=genes, metadata=metadata)
