"""Torch side of the token models: batches, the classification objective, inference loops."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from grnx_core.errors import DataError
from grnx_plugins.models._base import CellAttention
from grnx_plugins.models._layers import check_layers_heads
from grnx_plugins.models._training import BatchResult, Task, bucketed_batches

if TYPE_CHECKING:
    from grnx_core.data_types import TokenizedCells
    from grnx_plugins.models._base import TokenModel


class Batch(NamedTuple):
    """A padded batch: ids and values (B, L), ``mask`` True on real tokens, ``keep`` on genes."""

    ids: torch.Tensor
    values: torch.Tensor | None
    mask: torch.Tensor
    keep: torch.Tensor


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def make_batch(
    model: TokenModel,
    tokens: TokenizedCells,
    indices: np.ndarray,
    device: torch.device,
    max_length: int | None = None,
) -> Batch:
    info = model.token_info_
    ids, values, mask = tokens.padded(indices, pad_id=info["pad_id"], pad_value=info["pad_value"])
    if max_length is not None and ids.shape[1] > max_length:
        ids, mask = ids[:, :max_length], mask[:, :max_length]
        values = None if values is None else values[:, :max_length]
    if getattr(model.network_, "uses_values", False) and values is None:
        raise DataError(
            f"{model.name} needs token values (expression), but the tokens carry none. Use the "
            f"tokenizer this model is made for."
        )
    keep = mask & ~np.isin(ids, info["special_ids"])
    return Batch(
        ids=torch.from_numpy(ids).to(device),
        values=None if values is None else torch.from_numpy(values).to(device),
        mask=torch.from_numpy(mask).to(device),
        keep=torch.from_numpy(keep).to(device),
    )


class ClassificationTask(Task):
    """Cross-entropy on the cell labels (optionally class-weighted)."""

    def __init__(
        self,
        model: TokenModel,
        tokens: TokenizedCells,
        labels: np.ndarray,
        class_weights: np.ndarray | None,
        device: torch.device,
    ) -> None:
        self.model, self.tokens, self.labels, self.device = model, tokens, labels, device
        self.lengths = tokens.lengths
        self.weight = (
            None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32, device=device)
        )

    def batch(self, module: torch.nn.Module, indices: np.ndarray, training: bool) -> BatchResult:
        batch = make_batch(self.model, self.tokens, indices, self.device)
        logits = module(batch.ids, batch.values, batch.mask)
        targets = torch.from_numpy(self.labels[indices]).to(self.device)
        loss = F.cross_entropy(logits, targets, weight=self.weight)
        return BatchResult(
            loss=loss,
            n_items=len(indices),
            predictions=logits.argmax(dim=-1).cpu().numpy(),
            targets=self.labels[indices],
        )


class _GeneVocabulary:
    """What ``DataCollatorForLanguageModeling`` reads from a tokenizer: the mask token, its id, the
    vocabulary size (random replacements are drawn from all of it, as Geneformer's pretraining does)."""

    mask_token = "<mask>"

    def __init__(self, mask_id: int, vocab_size: int) -> None:
        self.mask_id, self.vocab_size = mask_id, vocab_size

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.mask_id

    def __len__(self) -> int:
        return self.vocab_size


class MaskedLMTask(Task):
    """BERT masked-language-model pretraining on the user's cells (Geneformer: 15% of gene tokens).

    The masking is transformers' ``DataCollatorForLanguageModeling.torch_mask_tokens`` (which
    Geneformer's pretrainer uses): each gene token is chosen with ``probability``; of the chosen,
    80% become ``<mask>``, 10% a token drawn uniformly from the whole vocabulary, 10% stay. Padding
    and special tokens are never chosen; a batch with no chosen token gets its first gene masked
    (a loss over nothing would be NaN). Draws come from a ``torch.Generator`` seeded with ``seed``
    (saved in checkpoints); validation batches use a fixed seed per batch so their loss is
    comparable across epochs.
    """

    def __init__(
        self,
        model: TokenModel,
        tokens: TokenizedCells,
        mask_id: int,
        probability: float,
        device: torch.device,
        seed: int,
    ) -> None:
        from transformers import DataCollatorForLanguageModeling

        self.model, self.tokens, self.device, self.seed = model, tokens, device, seed
        self.mask_id = mask_id
        self.lengths = tokens.lengths
        vocabulary: Any = _GeneVocabulary(mask_id, model.token_info_["vocab_size"])
        self.collator = DataCollatorForLanguageModeling(
            tokenizer=vocabulary, mlm=True, mlm_probability=probability
        )
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def mask(self, ids: torch.Tensor, keep: torch.Tensor, generator: torch.Generator) -> tuple[Any, Any]:
        """(masked input ids, labels with -100 where nothing is predicted), on the CPU."""
        self.collator.generator = generator
        inputs, labels = self.collator.torch_mask_tokens(ids.clone(), special_tokens_mask=~keep)
        if not bool((labels != -100).any()):
            row, column = torch.nonzero(keep)[0].tolist()
            labels[row, column], inputs[row, column] = ids[row, column], self.mask_id
        return inputs, labels

    def batch(self, module: torch.nn.Module, indices: np.ndarray, training: bool) -> BatchResult:
        batch = make_batch(self.model, self.tokens, indices, torch.device("cpu"))
        generator = (
            self.generator if training else torch.Generator().manual_seed(self.seed + 1 + int(indices[0]))
        )
        inputs, labels = self.mask(batch.ids, batch.keep, generator)
        logits = module(
            input_ids=inputs.to(self.device), attention_mask=batch.mask.long().to(self.device)
        ).logits
        labels = labels.to(self.device)
        chosen = labels != -100
        predicted = logits[chosen]
        loss = F.cross_entropy(predicted.float(), labels[chosen])
        return BatchResult(
            loss=loss,
            n_items=len(indices),
            predictions=predicted.argmax(-1).cpu().numpy(),
            targets=labels[chosen].cpu().numpy(),
        )


def predict_proba(model: TokenModel, tokens: TokenizedCells, batch_size: int) -> np.ndarray:
    network = model.network_
    network.eval()
    device = device_of(network)
    out = np.zeros((tokens.n_cells, len(model.classes_)), dtype=np.float32)
    with torch.no_grad():
        for indices in bucketed_batches(np.arange(tokens.n_cells), tokens.lengths, batch_size, None):
            batch = make_batch(model, tokens, indices, device)
            out[indices] = torch.softmax(network(batch.ids, batch.values, batch.mask), -1).cpu().numpy()
    return out


def embed(
    model: TokenModel, tokens: TokenizedCells, cells: np.ndarray, layer: int | None, batch_size: int
) -> np.ndarray:
    network = model.network_
    network.eval()
    device = device_of(network)
    rows = {cell: row for row, cell in enumerate(cells)}
    out = None
    with torch.no_grad():
        for indices in bucketed_batches(cells, tokens.lengths, batch_size, None):
            batch = make_batch(model, tokens, indices, device)
            vectors = (
                network.embed(batch.ids, batch.values, batch.mask, batch.keep, layer).float().cpu().numpy()
            )
            if out is None:
                out = np.zeros((len(cells), vectors.shape[1]), dtype=np.float32)
            out[[rows[c] for c in indices]] = vectors
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def attention(
    model: TokenModel,
    tokens: TokenizedCells,
    cells: np.ndarray,
    layers: list[int] | None,
    heads: list[int] | None,
    batch_size: int,
    max_length: int | None,
    include_special: bool,
) -> Iterator[CellAttention]:
    network = model.network_
    network.eval()
    device = device_of(network)
    layers, heads = check_layers_heads(layers, heads, network.n_layers, network.n_heads)
    for indices in bucketed_batches(cells, tokens.lengths, batch_size, None):
        # no_grad only around the computation: a generator must not leave grad mode off for
        # the caller's code between yields
        with torch.no_grad():
            batch = make_batch(model, tokens, indices, device, max_length)
            maps = network.attention(batch.ids, batch.values, batch.mask, layers, heads).cpu().numpy()
            shown = (batch.mask if include_special else batch.keep).cpu().numpy()
            ids = batch.ids.cpu().numpy()
        for row, cell in enumerate(indices):
            positions = np.flatnonzero(shown[row])
            first, last = (positions[0], positions[-1] + 1) if len(positions) else (0, 0)
            if last - first == len(positions):  # the usual case: one run of positions, a view
                cell_map = maps[row, first:last, first:last]
            else:
                cell_map = maps[row][np.ix_(positions, positions)]
            yield CellAttention(int(cell), ids[row, positions], cell_map)
        del maps
