"""CelluFormer's network (Wu et al., NeurIPS 2024): a permutation-invariant cell classifier.

A cell is the set of its expressed genes. Each gene's embedding (padding row zero) is multiplied
by its expression value, the sequence goes through encoder blocks without any positional
encoding under a key-padding mask, and the classifier reads the mean of the final hidden states
over the real genes only. Because nothing depends on token order, permuting a cell's genes
permutes every hidden state and attention map the same way and leaves the prediction unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from grnx_plugins.models._layers import EncoderLayer, EncoderStack, masked_mean


class CelluFormerNet(nn.Module):
    uses_values = True

    def __init__(
        self,
        *,
        vocab_size: int,
        n_classes: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
        pad_id: int,
        norm_first: bool,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.encoder = EncoderStack(
            [EncoderLayer(d_model, n_heads, d_ff, dropout, norm_first=norm_first) for _ in range(n_layers)]
        )
        self.classifier = nn.Linear(d_model, n_classes)
        self.n_layers, self.n_heads = n_layers, n_heads

    def embed_tokens(self, ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Padding is zeroed twice over (padding row and value 0), so it carries no signal even
        # if a tokenizer pads with another value.
        scaled = self.embedding(ids) * values.unsqueeze(-1)
        return scaled * mask.unsqueeze(-1).to(scaled.dtype)

    def forward(self, ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed_tokens(ids, values, mask), mask)
        return self.classifier(masked_mean(hidden, mask))

    def embed(
        self,
        ids: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        keep: torch.Tensor,
        layer: int | None = None,
    ) -> torch.Tensor:
        """Mean over real genes of the output of encoder block ``layer`` (default: the last).

        ``layer`` counts blocks from 1 (0 = the scaled embeddings; negative counts from the end:
        -1 is the last block), so the default is exactly the classifier's input.
        """
        n_run = self.n_layers if layer is None else (layer if layer >= 0 else self.n_layers + 1 + layer)
        hidden = self.encoder(self.embed_tokens(ids, values, mask), mask, n_layers=n_run)
        return masked_mean(hidden, keep)

    def attention(
        self,
        ids: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        layers: list[int],
        heads: list[int] | None,
    ) -> torch.Tensor:
        return self.encoder.attention(self.embed_tokens(ids, values, mask), mask, layers, heads)

    def input_gene_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the gene-embedding table: each gene's embedding before scaling by its value."""
        return self.embedding(ids)

    def hidden_states(
        self, ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, layer: int
    ) -> torch.Tensor:
        """Output of block ``layer`` (0 = the value-scaled embeddings) at every position, (B, L, d)."""
        return self.encoder(self.embed_tokens(ids, values, mask), mask, n_layers=layer)
