"""scGPT's network (Cui et al., Nature Methods 2024) with the state-dict names of its checkpoints.

Parameter names follow scGPT's ``TransformerModel`` so that ``best_model.pt`` files load
directly: ``encoder.embedding`` / ``encoder.enc_norm`` (gene tokens), ``value_encoder``
(``linear1``/``linear2``/``norm`` for continuous values, ``embedding``/``enc_norm`` for
categorical bins), ``transformer_encoder.layers.N.*`` (``nn.TransformerEncoderLayer`` names:
``self_attn.in_proj_weight``, ``self_attn.out_proj``, ``linear1``, ``linear2``, ``norm1``,
``norm2``) and ``cls_decoder._decoder.*`` / ``cls_decoder.out_layer``. Checkpoints trained with
flash attention name the packed projection ``self_attn.Wqkv.*``; it is the same q|k|v layout and
is renamed on load.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from grnx_plugins.models._layers import EncoderLayer, EncoderStack, masked_mean

#: scGPT whole-human pretraining settings (args.json of the released checkpoint).
WHOLE_HUMAN = {
    "embsize": 512,
    "nlayers": 12,
    "nheads": 8,
    "d_hid": 512,
    "dropout": 0.2,
    "n_layers_cls": 3,
    "input_emb_style": "continuous",
    "n_bins": 51,
    "pad_token": "<pad>",
    "pad_value": -2,
    "mask_value": -1,
    "max_seq_len": 1200,
}
#: Prefixes of the parameters every scGPT backbone has; the rest are task heads.
BACKBONE_PREFIXES = ("encoder.", "value_encoder.", "transformer_encoder.")


class GeneEncoder(nn.Module):
    def __init__(self, n_tokens: int, d_model: int, padding_idx: int | None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, d_model, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(ids))


class ContinuousValueEncoder(nn.Module):
    """Value -> vector: Linear(1, d), ReLU, Linear(d, d), LayerNorm, dropout; values clipped at 512."""

    def __init__(self, d_model: int, dropout: float, max_value: float = 512.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.max_value = max_value

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value)
        return self.dropout(self.norm(self.linear2(self.activation(self.linear1(x)))))


class CategoryValueEncoder(nn.Module):
    """Bin index -> embedding, LayerNorm (scGPT's ``category`` input style)."""

    def __init__(self, n_bins: int, d_model: int, padding_idx: int | None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_bins, d_model, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(values.long()))


class ClsDecoder(nn.Module):
    """(n_layers_cls - 1) x [Linear, ReLU, LayerNorm], then Linear to the classes."""

    def __init__(self, d_model: int, n_classes: int, n_layers: int) -> None:
        super().__init__()
        self._decoder = nn.ModuleList()
        for _ in range(n_layers - 1):
            self._decoder.extend([nn.Linear(d_model, d_model), nn.ReLU(), nn.LayerNorm(d_model)])
        self.out_layer = nn.Linear(d_model, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self._decoder:
            x = module(x)
        return self.out_layer(x)


class ScGPTNet(nn.Module):
    uses_values = True

    def __init__(self, args: dict[str, Any], n_tokens: int, n_classes: int, pad_id: int | None) -> None:
        super().__init__()
        d_model, dropout = int(args["embsize"]), float(args["dropout"])
        self.args = dict(args)
        self.input_emb_style = args.get("input_emb_style", "continuous")
        self.cell_emb_style = args.get("cell_emb_style", "cls")
        if self.cell_emb_style not in ("cls", "avg-pool"):
            raise ValueError(f"cell_emb_style {self.cell_emb_style!r} is not supported (cls, avg-pool)")
        self.encoder = GeneEncoder(n_tokens, d_model, pad_id)
        if self.input_emb_style == "continuous":
            self.value_encoder: nn.Module = ContinuousValueEncoder(d_model, dropout)
        elif self.input_emb_style == "category":
            n_bins = int(args["n_bins"])
            # scGPT's category style: bins 0..n_bins-1, pad = n_bins, mask = n_bins + 1.
            self.value_encoder = CategoryValueEncoder(n_bins + 2, d_model, padding_idx=n_bins)
            self.category_pad = n_bins
        elif self.input_emb_style == "scaling":
            self.value_encoder = nn.Identity()
        else:
            raise ValueError(
                f"input_emb_style {self.input_emb_style!r} is not one of continuous, category, scaling"
            )
        layers = [
            EncoderLayer(
                d_model,
                int(args["nheads"]),
                int(args["d_hid"]),
                dropout,
                norm_first=bool(args.get("pre_norm", False)),
            )
            for _ in range(int(args["nlayers"]))
        ]
        self.transformer_encoder = EncoderStack(layers)
        self.cls_decoder = ClsDecoder(d_model, max(n_classes, 1), int(args.get("n_layers_cls", 3)))
        self.n_layers, self.n_heads = int(args["nlayers"]), int(args["nheads"])
        # scGPT initialises the gene embeddings uniformly in [-0.1, 0.1].
        nn.init.uniform_(self.encoder.embedding.weight, -0.1, 0.1)
        if pad_id is not None:
            with torch.no_grad():
                self.encoder.embedding.weight[pad_id].zero_()

    def embed_tokens(self, ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        genes = self.encoder(ids)
        if self.input_emb_style == "category":
            values = torch.where(mask, values, torch.full_like(values, self.category_pad))
            return genes + self.value_encoder(values)
        if self.input_emb_style == "scaling":
            return genes * values.unsqueeze(-1)
        return genes + self.value_encoder(values)

    def encode(
        self, ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, n_layers: int | None = None
    ) -> torch.Tensor:
        return self.transformer_encoder(self.embed_tokens(ids, values, mask), mask, n_layers)

    def cell_embedding(self, hidden: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.cell_emb_style == "cls":
            return hidden[:, 0, :]
        # scGPT's avg-pool also averages padding; here padding is excluded.
        return masked_mean(hidden, mask)

    def forward(self, ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encode(ids, values, mask)
        return self.cls_decoder(self.cell_embedding(hidden, mask, mask))

    def embed(
        self,
        ids: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        keep: torch.Tensor,
        layer: int | None = None,
    ) -> torch.Tensor:
        """The cell embedding (``<cls>`` state or average) from the output of block ``layer``."""
        n_run = self.n_layers if layer is None else (layer if layer >= 0 else self.n_layers + 1 + layer)
        return self.cell_embedding(self.encode(ids, values, mask, n_run), keep, mask)

    def attention(
        self,
        ids: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        layers: list[int],
        heads: list[int] | None,
    ) -> torch.Tensor:
        return self.transformer_encoder.attention(self.embed_tokens(ids, values, mask), mask, layers, heads)

    def input_gene_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """``encoder(ids)``: gene-token embedding then its LayerNorm, no value (scGPT's GRN tutorial)."""
        return self.encoder(ids)

    def hidden_states(
        self, ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, layer: int
    ) -> torch.Tensor:
        """Output of block ``layer`` (0 = gene + value embeddings) at every position, (B, L, d)."""
        return self.encode(ids, values, mask, layer)


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename flash-attention keys (``Wqkv``) and strip a ``module.`` prefix (DataParallel)."""
    converted = {}
    for key, value in state.items():
        key = key.removeprefix("module.").replace("self_attn.Wqkv.", "self_attn.in_proj_")
        converted[key] = value
    return converted
