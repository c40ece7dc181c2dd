"""scGPT: checkpoint folders in scGPT's own format load and give the reference outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from grnx_core import DataError
from grnx_plugins.models.scgpt import ScGPT

TINY = {"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32, "dropout": 0.0, "n_layers_cls": 2}
D, LAYERS, HEADS, HIDDEN = 16, 2, 2, 32


def _binned_tokens(make_tokens, **kwargs):
    tokens = make_tokens(values="bins", prefix=["<cls>"], **kwargs)
    tokens.metadata["pad_value"] = -2.0
    return tokens


class Reference(nn.Module):
    """scGPT's TransformerModel forward for continuous values, written with torch's own layers."""

    def __init__(self, n_tokens: int, pad_id: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, D, padding_idx=pad_id)
        self.enc_norm = nn.LayerNorm(D)
        self.linear1, self.linear2, self.norm = nn.Linear(1, D), nn.Linear(D, D), nn.LayerNorm(D)
        layer = nn.TransformerEncoderLayer(D, HEADS, HIDDEN, 0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)

    def state(self, flash: bool) -> dict[str, torch.Tensor]:
        state = {
            "encoder.embedding.weight": self.embedding.weight,
            "encoder.enc_norm.weight": self.enc_norm.weight,
            "encoder.enc_norm.bias": self.enc_norm.bias,
            **{
                f"value_encoder.{k}": v
                for k, v in {
                    **{f"linear1.{n}": p for n, p in self.linear1.named_parameters()},
                    **{f"linear2.{n}": p for n, p in self.linear2.named_parameters()},
                    **{f"norm.{n}": p for n, p in self.norm.named_parameters()},
                }.items()
            },
            **{f"transformer_encoder.{k}": v for k, v in self.encoder.state_dict().items()},
            # heads the released checkpoints carry and a classifier does not use
            "decoder.fc.0.weight": torch.randn(D, D),
            "flag_encoder.weight": torch.randn(2, D),
            "mvc_decoder.gene2query.weight": torch.randn(D, D),
        }
        state = {k: v.detach().clone() for k, v in state.items()}
        if flash:
            state = {k.replace("self_attn.in_proj_", "self_attn.Wqkv."): v for k, v in state.items()}
        return state

    def inputs(self, ids, values):
        genes = self.enc_norm(self.embedding(ids))
        x = torch.clamp(values.unsqueeze(-1), max=512)
        return genes + self.norm(self.linear2(torch.relu(self.linear1(x))))


def _write_checkpoint(folder, tokens, flash=False, vocab=None):
    torch.manual_seed(7)
    reference = Reference(len(tokens.vocabulary), pad_id=0).eval()
    folder.mkdir()
    torch.save(reference.state(flash), folder / "best_model.pt")
    args = {
        "embsize": D,
        "nlayers": LAYERS,
        "nheads": HEADS,
        "d_hid": HIDDEN,
        "dropout": 0.0,
        "n_layers_cls": 3,
        "input_emb_style": "continuous",
        "n_bins": 51,
        "pad_token": "<pad>",
        "pad_value": -2,
        "mask_value": -1,
        "fast_transformer": flash,
        "max_seq_len": 1200,
    }
    (folder / "args.json").write_text(json.dumps(args))
    vocab = vocab or {name: i for i, name in enumerate(tokens.vocabulary)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return reference


def test_overfits_from_scratch_and_round_trips(make_tokens, make_context, tmp_path):
    tokens = _binned_tokens(make_tokens)
    model = ScGPT(**TINY).fit(make_context(tokens))
    assert np.mean(model.predict(tokens) == tokens.obs["label"].to_numpy()) == 1.0
    model.save(tmp_path / "model")
    assert {"args.json", "best_model.pt", "vocab.json"} <= {p.name for p in (tmp_path / "model").iterdir()}
    loaded = ScGPT.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.predict_proba(tokens), model.predict_proba(tokens))
    # the saved folder is itself a scGPT checkpoint: fine-tune from it again
    again = ScGPT(checkpoint=str(tmp_path / "model"), n_layers_cls=2).fit(make_context(tokens, epochs=0))
    np.testing.assert_allclose(again.embed(tokens), model.embed(tokens), atol=1e-6)


@pytest.mark.parametrize("flash", [False, True])
def test_scgpt_format_checkpoint_loads_with_reference_outputs(make_tokens, make_context, tmp_path, flash):
    tokens = _binned_tokens(make_tokens)
    reference = _write_checkpoint(tmp_path / "scgpt", tokens, flash=flash)
    model = ScGPT(checkpoint=str(tmp_path / "scgpt")).fit(make_context(tokens, epochs=0))
    assert "decoder.fc.0.weight" in model.load_report_["ignored"]
    embeddings = model.embed(tokens)
    with torch.no_grad():
        for cell in range(tokens.n_cells):
            ids, values = tokens.cell(cell)
            ids_t, values_t = torch.tensor(ids[None], dtype=torch.long), torch.tensor(values[None])
            hidden = reference.encoder(reference.inputs(ids_t, values_t))
            np.testing.assert_allclose(embeddings[cell], hidden[0, 0].numpy(), atol=2e-5)
            # attention of each layer from that layer's true input, via nn.MultiheadAttention
            x, total = reference.inputs(ids_t, values_t), 0
            for layer in reference.encoder.layers:
                total = total + layer.self_attn(x, x, x, need_weights=True)[1][0]
                x = layer(x)
            expected = (total / LAYERS).numpy()
            (cell_map,) = model.attention(tokens, cells=[cell], include_special=True)
            np.testing.assert_allclose(cell_map.attention, expected, atol=1e-5)
            (genes_only,) = model.attention(tokens, cells=[cell])
            np.testing.assert_array_equal(genes_only.token_ids, ids[1:])
            np.testing.assert_allclose(genes_only.attention, expected[1:, 1:], atol=1e-5)


def test_fine_tuning_a_checkpoint_and_freezing(make_tokens, make_context, tmp_path):
    tokens = _binned_tokens(make_tokens)
    _write_checkpoint(tmp_path / "scgpt", tokens)
    frozen_before = ScGPT(checkpoint=str(tmp_path / "scgpt"), freeze_layers=1).fit(
        make_context(tokens, epochs=0)
    )
    model = ScGPT(checkpoint=str(tmp_path / "scgpt"), freeze_layers=1).fit(make_context(tokens))
    assert np.mean(model.predict(tokens) == tokens.obs["label"].to_numpy()) == 1.0
    before = frozen_before.network_.transformer_encoder.layers
    after = model.network_.transformer_encoder.layers
    for (name, a), (_, b) in zip(before[0].state_dict().items(), after[0].state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(before[1].linear1.weight, after[1].linear1.weight)


def test_tokens_from_another_vocabulary_are_refused(make_tokens, make_context, tmp_path):
    tokens = _binned_tokens(make_tokens)
    shuffled = {name: (i + 5) % len(tokens.vocabulary) for i, name in enumerate(tokens.vocabulary)}
    _write_checkpoint(tmp_path / "scgpt", tokens, vocab=shuffled)
    with pytest.raises(DataError, match="vocab.json"):
        ScGPT(checkpoint=str(tmp_path / "scgpt")).fit(make_context(tokens, epochs=0))
    with pytest.raises(DataError, match="best_model.pt"):
        ScGPT(checkpoint=str(tmp_path / "nowhere")).fit(make_context(tokens, epochs=0))
