"""Gene embeddings of the token models: input-table rows and per-cell contextual hidden states.

:class:`GeneEmbeddings` is mixed into CelluFormer, Geneformer and scGPT (the contract is
``grnx_core.components.GeneEmbeddingModel``). Each network supplies ``input_gene_embeddings(ids)``
(what its "input embedding of a gene" is) and ``hidden_states(ids, values, mask, layer)`` (the
output of encoder block ``layer`` at every position, 0 = the embedding layer's output); the
batching, the layer check and the removal of special tokens and padding are written once here.
Nothing here imports torch at import time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from grnx_core.errors import DataError
from grnx_core.progress import progress

if TYPE_CHECKING:
    from grnx_core.data_types import TokenizedCells


def hidden_layer_index(layer: int, n_layers: int, who: str) -> int:
    """``layer`` as a block count: 0 = embeddings, k = output of block k, negative from the end."""
    index = layer if layer >= 0 else n_layers + 1 + layer
    if not 0 <= index <= n_layers:
        raise DataError(
            f"{who}: layer {layer} is outside [-{n_layers + 1}, {n_layers}] for a model with {n_layers} "
            "blocks (0 = the embedding layer's output, k = the output of block k, -1 = the last block)."
        )
    return index


class GeneEmbeddings:
    """Gene embeddings of a fitted :class:`~grnx_plugins.models._base.TokenModel`."""

    name: str
    network_: Any
    token_info_: dict[str, Any]

    def input_gene_embeddings(self, tokens: TokenizedCells, token_ids: np.ndarray) -> np.ndarray:
        """Rows of the model's input gene-embedding table for ``token_ids``, (n, d) float64.

        What a row is depends on the model (see its docstring); no cell and no value enters it.
        """
        import torch

        from grnx_plugins.models._token_tasks import device_of

        self._require_fitted()
        self._check_vocabulary(tokens)
        ids = np.asarray(token_ids, dtype=np.int64)
        vocab_size = int(self.token_info_["vocab_size"])
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise DataError(
                f"{self.name}: token ids must lie in [0, {vocab_size}) (the model's vocabulary); got "
                f"{int(ids.min())}..{int(ids.max())}."
            )
        network = self.network_
        network.eval()
        with torch.no_grad():
            rows = network.input_gene_embeddings(torch.from_numpy(ids).to(device_of(network)))
        return rows.double().cpu().numpy()

    def hidden_state_batches(
        self,
        tokens: TokenizedCells,
        *,
        cells: np.ndarray | None = None,
        layer: int = -1,
        batch_size: int = 8,
        autocast_dtype: str | None = None,
    ) -> Iterator[tuple[np.ndarray, Any, Any]]:
        """Per batch of cells ``(cells, hidden, keep)``: see :func:`gene_state_batches`."""
        chosen = np.arange(tokens.n_cells) if cells is None else np.asarray(cells, dtype=np.int64)
        return gene_state_batches(self, tokens, chosen, layer, batch_size, autocast_dtype)

    def contextual_gene_embeddings(
        self,
        tokens: TokenizedCells,
        *,
        cells: np.ndarray | None = None,
        layer: int = -1,
        batch_size: int = 8,
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Per cell ``(cell, token_ids, hidden)``: hidden state ``layer`` at each of its gene tokens.

        ``hidden`` is (m, d) float32 for the cell's m gene tokens in sequence order (special tokens
        and padding dropped); ``layer`` 0 is the embedding layer's output, k the output of block k,
        negative counts from the end (-1: the last block). Cells come in batches of similar
        length, not in input order: use the yielded ``cell`` (a row of ``tokens``).
        """
        chosen = np.arange(tokens.n_cells) if cells is None else np.asarray(cells, dtype=np.int64)
        with progress(total=len(chosen), desc=f"{self.name}: contextual gene embeddings", unit="cell") as bar:
            for indices, batch, hidden in _hidden_state_passes(self, tokens, chosen, layer, batch_size, None):
                states = hidden.float().cpu().numpy()
                keep = batch.keep.cpu().numpy()
                ids = batch.ids.cpu().numpy()
                for row, cell in enumerate(indices):
                    positions = np.flatnonzero(keep[row])
                    yield int(cell), ids[row, positions], states[row, positions]
                bar.update(len(indices))


def gene_state_batches(
    model: Any,
    tokens: TokenizedCells,
    cells: np.ndarray,
    layer: int,
    batch_size: int,
    autocast_dtype: str | None = None,
) -> Iterator[tuple[np.ndarray, Any, Any]]:
    """Per batch of ``cells``: ``(cells, hidden, keep)``, the hidden state ``layer`` at every position.

    ``hidden`` is a (B, L, d) float32 torch tensor and ``keep`` a (B, L) bool tensor, True on gene
    tokens (False on special tokens and padding), both on the model's device (the caller reduces
    them there instead of copying whole batches of states to the host); row b holds cell
    ``cells[b]``'s tokens from position 0, as ``contextual_gene_embeddings`` yields them cell by
    cell. For callers that embed many token batches (in silico perturbation) and vectorise over the
    batch: no progress bar, batches of similar length, not in input order, computed without
    gradients. ``autocast_dtype`` (e.g. ``"bfloat16"``) runs the forward passes under
    ``torch.autocast`` on the model's device; the states are returned as float32 either way.
    ``model`` is a fitted :class:`GeneEmbeddings` model.
    """
    for indices, batch, hidden in _hidden_state_passes(
        model, tokens, cells, layer, batch_size, autocast_dtype
    ):
        yield indices, hidden.float(), batch.keep


def _hidden_state_passes(
    model: Any,
    tokens: TokenizedCells,
    cells: np.ndarray,
    layer: int,
    batch_size: int,
    autocast_dtype: str | None,
) -> Iterator[tuple[np.ndarray, Any, Any]]:
    """The forward passes both readers share: per batch of similar length ``(cells, batch, hidden)``.

    ``batch`` is the model's input batch (ids, keep mask) and ``hidden`` the state ``layer`` on the
    model's device. Gradients are off only around each pass: a generator must not leave grad mode
    off for the caller's code between yields.
    """
    import contextlib

    import torch

    from grnx_plugins.models._token_tasks import device_of, make_batch
    from grnx_plugins.models._training import bucketed_batches

    model._require_fitted()
    model._check_vocabulary(tokens)
    network = model.network_
    index = hidden_layer_index(layer, int(network.n_layers), model.name)
    network.eval()
    device = device_of(network)
    for indices in bucketed_batches(np.asarray(cells, dtype=np.int64), tokens.lengths, batch_size, None):
        precision = (
            torch.autocast(device.type, dtype=getattr(torch, autocast_dtype))
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.no_grad(), precision:
            batch = make_batch(model, tokens, indices, device)
            hidden = network.hidden_states(batch.ids, batch.values, batch.mask, index)
        yield indices, batch, hidden
