"""Transformer encoder blocks that can report their attention, shared by CelluFormer and scGPT.

:class:`EncoderLayer` has exactly the parameters (and state-dict names) of
``torch.nn.TransformerEncoderLayer`` (``self_attn.in_proj_weight``, ``self_attn.out_proj``,
``linear1``, ``linear2``, ``norm1``, ``norm2``), so checkpoints of either load into the other. It
differs in one way: it computes attention itself, so it can report the post-softmax attention of
the very input it processes (:func:`attention_with_map`). ``nn.TransformerEncoderLayer`` never
returns weights and its fast path skips hooks, which is why the published WDS code recomputed
attention from the embedding output for every layer (a defect listed in docs/methods/extractors.md#attention).
Without a map to fill, attention runs through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EncoderLayer(nn.Module):
    """Post-norm (default, as ``nn.TransformerEncoderLayer``) or pre-norm encoder block."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
        *,
        norm_first: bool = False,
        activation: str = "relu",
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm_first = norm_first
        self.activation = {"relu": F.relu, "gelu": F.gelu}[activation]
        self.n_heads = n_heads

    def attend(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor,
        attention_sum: torch.Tensor | None = None,
        heads: list[int] | None = None,
    ) -> torch.Tensor:
        """Multi-head self-attention of ``x`` (B, L, d); ``key_mask`` is True on real tokens.

        The packed in-projection is split as q, k, v along the feature axis first and each of
        them into heads afterwards (the layout ``nn.MultiheadAttention`` uses). With
        ``attention_sum`` (B, L, L) the post-softmax probabilities, summed over ``heads`` (all
        when None), are added into it.
        """
        batch, length, d_model = x.shape
        head_dim = d_model // self.n_heads
        packed = F.linear(x, self.self_attn.in_proj_weight, self.self_attn.in_proj_bias)
        q, k, v = packed.chunk(3, dim=-1)
        q, k, v = (t.view(batch, length, self.n_heads, head_dim).transpose(1, 2) for t in (q, k, v))
        dropout = self.self_attn.dropout if self.training else 0.0
        if attention_sum is not None:
            out = attention_with_map(q, k, v, key_mask, attention_sum, heads, dropout, self.training)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=dropout
            )
        out = out.transpose(1, 2).reshape(batch, length, d_model)
        return self.self_attn.out_proj(out)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor,
        attention_sum: torch.Tensor | None = None,
        heads: list[int] | None = None,
    ) -> torch.Tensor:
        if self.norm_first:
            # Pre-norm: the attention's actual input is norm1(x), not x.
            x = x + self.dropout1(self.attend(self.norm1(x), key_mask, attention_sum, heads))
            x = x + self.dropout2(self.feed_forward(self.norm2(x)))
        else:
            x = self.norm1(x + self.dropout1(self.attend(x, key_mask, attention_sum, heads)))
            x = self.norm2(x + self.dropout2(self.feed_forward(x)))
        return x


class EncoderStack(nn.Module):
    """``layers.N.*`` like ``nn.TransformerEncoder``, run one layer at a time."""

    def __init__(self, layers: list[EncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, n_layers: int | None = None) -> torch.Tensor:
        for layer in self.layers[: n_layers if n_layers is not None else len(self.layers)]:
            x = layer(x, key_mask)
        return x

    def attention(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor,
        layers: list[int],
        heads: list[int] | None,
    ) -> torch.Tensor:
        """Attention averaged over the chosen layers and heads, (B, L, L), float32.

        Each layer's map comes from that layer's true input (the previous layer's output); the
        probabilities are folded into one (B, L, L) sum block by block, so no layer's
        (B, H, L, L) maps are ever held; layers after the last chosen one are not run.
        """
        wanted = set(layers)
        batch, length, _ = x.shape
        total = torch.zeros(batch, length, length, dtype=torch.float32, device=x.device)
        for index, layer in enumerate(self.layers[: max(layers) + 1]):
            x = layer(x, key_mask, total if index in wanted else None, heads)
        n_heads = self.layers[0].n_heads if heads is None else len(heads)
        return total.div_(float(len(wanted) * n_heads))


#: Bytes of attention scores processed at once: small enough to stay in a CPU's L2/L3 cache.
BLOCK_BYTES = 2**21


def attention_with_map(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor,
    attention_sum: torch.Tensor,
    heads: list[int] | None,
    dropout: float = 0.0,
    training: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention that also adds its probabilities, summed over heads, to a map.

    ``q, k, v`` are (B, H, L, d_h); returns the attention output (B, H, L, d_h) and adds
    ``sum_h softmax(q k^T / sqrt(d_h) + mask)`` over ``heads`` into ``attention_sum`` (B, L, L).
    One cell and a block of query rows (about ``BLOCK_BYTES`` of scores) at a time, in reused
    buffers: the (B, H, L, L) probabilities never exist and the working set stays in cache, which
    keeps map extraction near the cost of a fused attention kernel. A cell whose real tokens are
    a prefix (padding at the end, as ``TokenizedCells.padded`` builds batches) is computed over its
    real tokens only; its padding rows get output 0 (nothing reads them), padding columns get 0.
    """
    batch, n_heads, length, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    queries = (q * scale).contiguous()
    keys_t = k.transpose(-2, -1).contiguous()
    values = v.contiguous()
    out = torch.zeros_like(queries)
    rows = max(1, BLOCK_BYTES // (n_heads * length * queries.element_size()))
    scores_store = queries.new_empty(n_heads * rows * length)  # the softmax overwrites it in place
    sum_store = attention_sum.new_empty(rows * length)
    out_store = queries.new_empty(n_heads * rows * head_dim)
    lengths = key_mask.sum(dim=1).tolist()
    for cell in range(batch):
        n_real = int(lengths[cell])
        prefix = bool(key_mask[cell, :n_real].all())
        width = n_real if prefix else length
        bias = None
        if not prefix:
            bias = torch.zeros(1, 1, length, dtype=q.dtype, device=q.device)
            bias.masked_fill_(~key_mask[cell][None, None, :], float("-inf"))
        cell_keys = keys_t[cell, :, :, :width]
        cell_values = values[cell, :, :width]
        for start in range(0, width, rows):
            stop = min(width, start + rows)
            block = stop - start
            scores = scores_store[: n_heads * block * width].view(n_heads, block, width)
            summed = sum_store[: block * width].view(block, width)
            torch.matmul(queries[cell, :, start:stop], cell_keys, out=scores)
            if bias is not None:
                scores += bias
            # in place: one buffer less in cache, ~8% faster at 8 heads x 1,024 tokens x 16 dims
            probs = torch.softmax(scores, dim=-1, out=scores)
            torch.sum(probs if heads is None else probs[heads], dim=0, dtype=summed.dtype, out=summed)
            attention_sum[cell, start:stop, :width] += summed
            if dropout > 0.0 and training:
                probs = F.dropout(probs, dropout, training)
            block_out = out_store[: n_heads * block * head_dim].view(n_heads, block, head_dim)
            torch.matmul(probs, cell_values, out=block_out)
            out[cell, :, start:stop] = block_out
    return out


def masked_mean(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where ``keep`` is True; (B, L, d) -> (B, d)."""
    weights = keep.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def check_layers_heads(
    layers: list[int] | None, heads: list[int] | None, n_layers: int, n_heads: int
) -> tuple[list[int], list[int] | None]:
    """Normalise layer / head selections (negative indices count from the end)."""
    from grnx_core.errors import GrnxError

    chosen_layers = (
        list(range(n_layers))
        if layers is None
        else [layer + n_layers if layer < 0 else layer for layer in layers]
    )
    if not chosen_layers or any(not 0 <= layer < n_layers for layer in chosen_layers):
        raise GrnxError(f"attention layers must be in [-{n_layers}, {n_layers}); got {layers}.")
    chosen_heads = None
    if heads is not None:
        chosen_heads = [head + n_heads if head < 0 else head for head in heads]
        if not chosen_heads or any(not 0 <= head < n_heads for head in chosen_heads):
            raise GrnxError(f"attention heads must be in [-{n_heads}, {n_heads}); got {heads}.")
    return sorted(set(chosen_layers)), None if chosen_heads is None else sorted(set(chosen_heads))
