"""Geneformer: local checkpoints, fine-tuning, freezing, embeddings and attention vs Hugging Face."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from grnx_core import DataError, TokenizedCells
from grnx_plugins.models.geneformer import Geneformer

TINY = {
    "n_layers": 2,
    "hidden_size": 16,
    "n_heads": 2,
    "intermediate_size": 32,
    "max_positions": 32,
    "dropout": 0.0,
}


def _rank_tokens(make_tokens, special: bool = False, **kwargs):
    """Rank-value-like tokens: <pad>=0, <mask>=1 (+ <cls>=2, <eos>=3 for V2-style cells)."""
    if special:
        return make_tokens(values=None, prefix=["<mask>", "<cls>"], suffix=["<eos>"], **kwargs)
    return make_tokens(values=None, prefix=["<mask>"], **kwargs)


def test_overfits_tiny_labelled_set_and_round_trips(make_tokens, make_context, tmp_path):
    tokens = _rank_tokens(make_tokens)
    model = Geneformer(**TINY).fit(make_context(tokens))
    assert np.mean(model.predict(tokens) == tokens.obs["label"].to_numpy()) == 1.0
    model.save(tmp_path / "model")
    assert (tmp_path / "model" / "hf" / "config.json").is_file()
    loaded = Geneformer.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.predict_proba(tokens), model.predict_proba(tokens))
    np.testing.assert_array_equal(loaded.embed(tokens), model.embed(tokens))


def _save_pretrained_checkpoint(folder, vocab_size):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(3)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_act="relu",
        pad_token_id=0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    reference = BertForMaskedLM(config).eval()
    reference.save_pretrained(folder)
    return reference


@pytest.mark.parametrize("special", [False, True])
def test_save_pretrained_checkpoint_loads_with_identical_outputs(
    make_tokens, make_context, tmp_path, special
):
    tokens = _rank_tokens(make_tokens, special=special)
    reference = _save_pretrained_checkpoint(tmp_path / "gf", len(tokens.vocabulary))
    model = Geneformer(checkpoint=str(tmp_path / "gf")).fit(make_context(tokens, epochs=0))
    gene_ids = [i for i, name in enumerate(tokens.vocabulary) if not name.startswith("<")]
    # Geneformer's cell embedding: mean over gene tokens of the penultimate layer (emb_layer=-1)
    with torch.no_grad():
        for cell in range(tokens.n_cells):
            ids, _ = tokens.cell(cell)
            states = reference.bert(
                torch.tensor(ids[None], dtype=torch.long), output_hidden_states=True
            ).hidden_states
            genes = torch.from_numpy(np.isin(ids, gene_ids))
            for layer in (-2, -1, 0):
                expected = states[layer][0][genes].mean(0).numpy()
                got = model.embed(tokens, layer=layer, cells=[cell])[0]
                np.testing.assert_allclose(got, expected, atol=2e-5)
    # attention: Hugging Face's own eager maps, averaged over heads and layers
    with torch.no_grad():
        for cell_map in model.attention(tokens, batch_size=5, include_special=True):
            ids, _ = tokens.cell(cell_map.cell)
            output = reference.bert(torch.tensor(ids[None], dtype=torch.long), output_attentions=True)
            expected = torch.stack(output.attentions)[:, 0].mean(dim=(0, 1)).numpy()
            np.testing.assert_array_equal(cell_map.token_ids, ids)
            np.testing.assert_allclose(cell_map.attention, expected, atol=1e-5)
            np.testing.assert_allclose(cell_map.attention.sum(axis=1), 1.0, atol=1e-5)


def test_attention_without_special_tokens_and_selected_heads(make_tokens, make_context, tmp_path):
    tokens = _rank_tokens(make_tokens, special=True)
    reference = _save_pretrained_checkpoint(tmp_path / "gf", len(tokens.vocabulary))
    model = Geneformer(checkpoint=str(tmp_path / "gf")).fit(make_context(tokens, epochs=0))
    with torch.no_grad():
        for cell_map in model.attention(tokens, layers=[-1], heads=[1], batch_size=4):
            ids, _ = tokens.cell(cell_map.cell)
            output = reference.bert(torch.tensor(ids[None], dtype=torch.long), output_attentions=True)
            full = output.attentions[-1][0, 1].numpy()
            genes = ~np.isin(ids, [0, 1, 2, 3])
            np.testing.assert_array_equal(cell_map.token_ids, ids[genes])
            np.testing.assert_allclose(cell_map.attention, full[np.ix_(genes, genes)], atol=1e-5)


def test_freeze_layers_leaves_frozen_weights_unchanged(make_tokens, make_context):
    tokens = _rank_tokens(make_tokens)
    untouched = Geneformer(**TINY, freeze_layers=1).fit(make_context(tokens, epochs=0))
    trained = Geneformer(**TINY, freeze_layers=1).fit(make_context(tokens, epochs=3))
    before = untouched.network_.bert.encoder.layer
    after = trained.network_.bert.encoder.layer
    for (name, a), (_, b) in zip(before[0].state_dict().items(), after[0].state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(before[1].attention.self.query.weight, after[1].attention.self.query.weight)
    # the recipe's train.freeze_layers applies when the model does not set its own
    from_train = Geneformer(**TINY).fit(make_context(tokens, epochs=3, freeze_layers=1))
    for (name, a), (_, b) in zip(
        before[0].state_dict().items(), from_train.network_.bert.encoder.layer[0].state_dict().items()
    ):
        assert torch.equal(a, b), name
    with pytest.raises(Exception, match="freeze_layers"):
        Geneformer(**TINY, freeze_layers=5).fit(make_context(tokens, epochs=1))


def test_masked_lm_pretraining_masks_fifteen_percent_and_learns(make_tokens, make_context):
    from grnx_plugins.models._token_tasks import MaskedLMTask

    # cells are runs of 8 consecutive genes: a masked gene is predictable from its neighbours
    rng = np.random.default_rng(0)
    vocabulary = ["<pad>", "<mask>"] + [f"G{i}" for i in range(1, 15)]
    starts = rng.integers(2, 9, size=40)
    tokens = TokenizedCells(
        input_ids=np.concatenate([np.arange(s, s + 8) for s in starts]),
        offsets=np.arange(41) * 8,
        obs=pd.DataFrame(index=[f"c{i}" for i in range(40)]),
        vocabulary=vocabulary,
        metadata={"pad_id": 0},
    )
    # without labels the model is only pretrained
    context = make_context(tokens, epochs=0)
    context.roles.label_key = None
    model = Geneformer(**TINY, pretrain_epochs=40).fit(context)
    losses = [h["pretrain/loss"] for h in model.history_]
    assert losses[-1] < 0.5 * losses[0]
    # the masking rule itself, measured on many draws
    task = MaskedLMTask(model, tokens, mask_id=1, probability=0.15, device=torch.device("cpu"), seed=0)
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            seen.append(input_ids.clone())
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, len(tokens.vocabulary))})

    originals = []
    for _ in range(200):
        task.batch(Spy(), np.arange(tokens.n_cells), training=True)
        originals.append(torch.from_numpy(tokens.padded(np.arange(tokens.n_cells))[0]))
    changed = torch.cat([(s != o).flatten() for s, o in zip(seen, originals)]).float()
    to_mask = torch.cat([(s == 1).flatten() for s in seen]).float()
    real = torch.cat([torch.from_numpy(tokens.padded(np.arange(tokens.n_cells))[2]).flatten()] * 200).float()
    # 15% chosen; 80% of them -> <mask>, 10% -> random other token (a few draw the same token)
    assert to_mask.sum() / real.sum() == pytest.approx(0.15 * 0.8, abs=0.01)
    assert changed.sum() / real.sum() == pytest.approx(0.15 * 0.8 + 0.15 * 0.1 * (1 - 1 / 14), abs=0.01)


def test_missing_checkpoint_and_too_long_cells_are_clear_errors(make_tokens, make_context, tmp_path):
    tokens = _rank_tokens(make_tokens)
    with pytest.raises(DataError, match="config.json"):
        Geneformer(checkpoint=str(tmp_path / "nowhere")).fit(make_context(tokens))
    with pytest.raises(DataError, match="max_length"):
        Geneformer(**{**TINY, "max_positions": 4}).fit(make_context(tokens, epochs=1))
