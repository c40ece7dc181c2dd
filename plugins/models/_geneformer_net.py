"""Geneformer's network: Hugging Face BERT, driven one layer at a time for embeddings and attention.

Hugging Face's BERT returns attention maps only with ``attn_implementation="eager"`` and then
keeps every layer's (batch, heads, L, L) maps until the call returns (12 layers x 12 heads x
4096^2 floats = 9.7 GB for one V2 cell). Here the ``BertLayer``s are run one at a time; a layer
whose map is wanted runs BERT's self-attention with the layer's own weights, block by block,
folding the head-summed probabilities into one (B, L, L) sum (67 MB for a V2 cell).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from grnx_plugins.models._layers import attention_with_map, masked_mean

#: Theodoris et al. 2023 (V1, gf-6L-30M-i2048) and Chen et al. 2024 (V2, gf-12L-104M-i4096).
ARCHITECTURES: dict[str, dict[str, int]] = {
    "v1": {
        "num_hidden_layers": 6,
        "hidden_size": 256,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        "max_position_embeddings": 2048,
        "vocab_size": 25_426,
    },
    "v2-104m": {
        "num_hidden_layers": 12,
        "hidden_size": 768,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": 4096,
        "vocab_size": 20_275,
    },
}
#: Settings shared by the released Geneformer configs.
COMMON = {
    "hidden_act": "relu",
    "layer_norm_eps": 1e-12,
    "attention_probs_dropout_prob": 0.02,
    "hidden_dropout_prob": 0.02,
    "initializer_range": 0.02,
    "pad_token_id": 0,
    "type_vocab_size": 2,
}


def bert_config(architecture: str, overrides: dict[str, Any]) -> Any:
    from transformers import BertConfig

    values: dict[str, Any] = {**COMMON, **ARCHITECTURES[architecture]}
    values.update({key: value for key, value in overrides.items() if value is not None})
    return BertConfig(**values)


class GeneformerNet(nn.Module):
    """Wraps ``BertForSequenceClassification`` (or ``BertForMaskedLM`` when there are no labels)."""

    uses_values = False

    def __init__(self, hf_model: Any, embedding_layer: int = -2) -> None:
        super().__init__()
        self.hf = hf_model
        config = hf_model.config
        self.n_layers = config.num_hidden_layers
        self.n_heads = config.num_attention_heads
        self.max_positions = config.max_position_embeddings
        self.embedding_layer = embedding_layer

    @property
    def bert(self) -> Any:
        return self.hf.bert

    def _check_length(self, ids: torch.Tensor) -> None:
        if ids.shape[1] > self.max_positions:
            from grnx_core.errors import DataError

            raise DataError(
                f"geneformer: a cell has {ids.shape[1]} tokens but the model takes at most "
                f"{self.max_positions}. Set the tokenizer's max_length to {self.max_positions} or less."
            )

    def forward(self, ids: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        self._check_length(ids)
        return self.hf(input_ids=ids, attention_mask=mask.long()).logits

    def _layers(
        self, ids: torch.Tensor, mask: torch.Tensor, n_run: int
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (layer index, its output) for the first ``n_run`` layers, one layer at a time."""
        self._check_length(ids)
        hidden = self.bert.embeddings(input_ids=ids)
        additive = self._additive_mask(mask, hidden.dtype)
        for index, layer in enumerate(self.bert.encoder.layer[:n_run]):
            hidden = layer(hidden, additive)
            yield index, hidden

    @staticmethod
    def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # Hugging Face's extended mask: 0 on real tokens, the dtype's minimum on padding.
        return (~mask)[:, None, None, :].to(dtype) * torch.finfo(dtype).min

    @staticmethod
    def _layer_with_map(
        layer: Any,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        total: torch.Tensor,
        heads: list[int] | None,
    ) -> torch.Tensor:
        """One ``BertLayer``: BERT's self-attention (q, k, v projections, 1/sqrt(d_h), softmax,
        output dense + residual LayerNorm, feed-forward), adding its head-summed probabilities into
        ``total`` block by block instead of returning (B, H, L, L) maps."""
        self_attention = layer.attention.self
        batch, length, _ = hidden.shape
        n_heads, head_dim = self_attention.num_attention_heads, self_attention.attention_head_size
        q, k, v = (
            projection(hidden).view(batch, length, n_heads, head_dim).transpose(1, 2)
            for projection in (self_attention.query, self_attention.key, self_attention.value)
        )
        context = attention_with_map(
            q, k, v, mask, total, heads, scale=getattr(self_attention, "scaling", head_dim**-0.5)
        )
        context = context.transpose(1, 2).reshape(batch, length, n_heads * head_dim)
        attended = layer.attention.output(context, hidden)
        return layer.feed_forward_chunk(attended)

    def hidden_state(self, ids: torch.Tensor, mask: torch.Tensor, layer: int) -> torch.Tensor:
        """Hugging Face ``hidden_states[layer]``: 0 = embeddings, k = output of layer k, -1 = last."""
        index = layer if layer >= 0 else self.n_layers + 1 + layer
        if not 0 <= index <= self.n_layers:
            from grnx_core.errors import GrnxError

            raise GrnxError(f"geneformer: layer {layer} is outside [-{self.n_layers + 1}, {self.n_layers}].")
        if index == 0:
            self._check_length(ids)
            return self.bert.embeddings(input_ids=ids)
        hidden = None
        for _, output in self._layers(ids, mask, index):
            hidden = output
        return hidden

    def embed(
        self,
        ids: torch.Tensor,
        values: torch.Tensor | None,
        mask: torch.Tensor,
        keep: torch.Tensor,
        layer: int | None = None,
    ) -> torch.Tensor:
        """Mean over gene tokens (special tokens and padding excluded) of ``hidden_states[layer]``."""
        hidden = self.hidden_state(ids, mask, self.embedding_layer if layer is None else layer)
        return masked_mean(hidden, keep)

    def attention(
        self,
        ids: torch.Tensor,
        values: torch.Tensor | None,
        mask: torch.Tensor,
        layers: list[int],
        heads: list[int] | None,
    ) -> torch.Tensor:
        self._check_length(ids)
        wanted = set(layers)
        hidden = self.bert.embeddings(input_ids=ids)
        batch, length, _ = hidden.shape
        total = torch.zeros(batch, length, length, dtype=torch.float32, device=hidden.device)
        additive = self._additive_mask(mask, hidden.dtype)
        for index, layer in enumerate(self.bert.encoder.layer[: max(layers) + 1]):
            if index in wanted:
                hidden = self._layer_with_map(layer, hidden, mask, total, heads)
            else:
                hidden = layer(hidden, additive)
        n_heads = self.n_heads if heads is None else len(heads)
        return total.div_(float(len(wanted) * n_heads))

    def input_gene_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """BERT's word-embedding rows (before position embeddings and the embedding LayerNorm)."""
        return self.bert.embeddings.word_embeddings(ids)

    def hidden_states(
        self, ids: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, layer: int
    ) -> torch.Tensor:
        """Hugging Face ``hidden_states[layer]`` at every position, (B, L, d); values are unused."""
        return self.hidden_state(ids, mask, layer)
