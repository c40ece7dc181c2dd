"""CelluFormer: learns a planted marker, round-trips, and its attention maps are the true ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from grnx_core import TokenizedCells
from grnx_plugins.models.celluformer import CelluFormer

TINY = {"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32, "dropout": 0.0}


def _fit(make_tokens, make_context, **params):
    tokens = make_tokens()
    context = make_context(tokens)
    model = CelluFormer(**{**TINY, **params}).fit(context)
    return model, tokens, context


def test_overfits_tiny_labelled_set(make_tokens, make_context):
    model, tokens, context = _fit(make_tokens, make_context)
    assert np.mean(model.predict(tokens) == tokens.obs["label"].to_numpy()) == 1.0
    # one metrics dict per epoch, logged with the epoch as step
    steps = [step for step, metrics in context.logger.metrics]
    assert steps == list(range(1, 31))
    assert context.logger.metrics[-1][1]["train/loss"] < context.logger.metrics[0][1]["train/loss"]


def test_same_seed_same_weights_and_checkpoint_round_trip(make_tokens, make_context, tmp_path):
    tokens = make_tokens()
    first = CelluFormer(**{**TINY, "dropout": 0.1}).fit(make_context(tokens, epochs=3))
    second = CelluFormer(**{**TINY, "dropout": 0.1}).fit(make_context(tokens, epochs=3))
    for (name, a), (_, b) in zip(first.network_.state_dict().items(), second.network_.state_dict().items()):
        assert torch.equal(a, b), name
    first.save(tmp_path / "model")
    loaded = CelluFormer.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.predict_proba(tokens), first.predict_proba(tokens))
    np.testing.assert_array_equal(loaded.embed(tokens), first.embed(tokens))
    a = {m.cell: m.attention for m in first.attention(tokens, batch_size=4)}
    b = {m.cell: m.attention for m in loaded.attention(tokens, batch_size=4)}
    for cell in a:
        np.testing.assert_array_equal(a[cell], b[cell])


def _reference_maps(model: CelluFormer, tokens: TokenizedCells, layers: list[int]) -> list[np.ndarray]:
    """Attention computed with torch's own nn.TransformerEncoderLayer from the model's weights."""
    network = model.network_
    reference = nn.ModuleList(
        nn.TransformerEncoderLayer(TINY["d_model"], TINY["n_heads"], TINY["d_ff"], 0.0, batch_first=True)
        for _ in range(TINY["n_layers"])
    )
    reference.load_state_dict(network.encoder.layers.state_dict())
    reference.eval()
    maps = []
    with torch.no_grad():
        for cell in range(tokens.n_cells):
            ids, values = tokens.cell(cell)
            x = (
                network.embedding(torch.tensor(ids[None], dtype=torch.long))
                * torch.tensor(values)[None, :, None]
            )
            total = torch.zeros(len(ids), len(ids))
            for index, layer in enumerate(reference):
                _, weights = layer.self_attn(x, x, x, need_weights=True, average_attn_weights=False)
                if index in layers:
                    total += weights[0].sum(0)
                x = layer(x)
            maps.append((total / (len(layers) * TINY["n_heads"])).numpy())
    return maps


@pytest.mark.parametrize("layers", [None, [1], [0]])
def test_attention_equals_maps_from_torch_layers(make_tokens, make_context, layers):
    tokens = make_tokens()
    model = CelluFormer(**TINY).fit(make_context(tokens, epochs=5))
    expected = _reference_maps(model, tokens, layers or [0, 1])
    seen = set()
    # batch of 6 mixes lengths, so shorter cells are padded inside the batch
    for cell_map in model.attention(tokens, layers=layers, batch_size=6):
        ids, _ = tokens.cell(cell_map.cell)
        np.testing.assert_array_equal(cell_map.token_ids, ids)
        np.testing.assert_allclose(cell_map.attention, expected[cell_map.cell], atol=1e-5)
        np.testing.assert_allclose(cell_map.attention.sum(axis=1), 1.0, atol=1e-5)
        seen.add(cell_map.cell)
    assert seen == set(range(tokens.n_cells))


def test_padding_receives_no_attention_and_does_not_change_maps(make_tokens, make_context):
    tokens = make_tokens()
    model = CelluFormer(**TINY).fit(make_context(tokens, epochs=3))
    from grnx_plugins.models._token_tasks import make_batch

    cells = np.arange(tokens.n_cells)
    batch = make_batch(model, tokens, cells, torch.device("cpu"))
    with torch.no_grad():
        maps = model.network_.attention(batch.ids, batch.values, batch.mask, [0, 1], None)
    padded_columns = maps.permute(0, 2, 1)[~batch.mask]
    assert torch.count_nonzero(padded_columns) == 0
    alone = {m.cell: m.attention for m in model.attention(tokens, batch_size=1)}
    together = {m.cell: m.attention for m in model.attention(tokens, batch_size=tokens.n_cells)}
    for cell in alone:
        np.testing.assert_allclose(together[cell], alone[cell], atol=1e-6)


def test_permuting_genes_permutes_the_map_and_keeps_the_prediction(make_tokens, make_context):
    tokens = make_tokens()
    model = CelluFormer(**TINY).fit(make_context(tokens, epochs=5))
    rng = np.random.default_rng(1)
    permutations, ids, values = [], [], []
    for cell in range(tokens.n_cells):
        cell_ids, cell_values = tokens.cell(cell)
        order = rng.permutation(len(cell_ids))
        permutations.append(order)
        ids.append(cell_ids[order])
        values.append(cell_values[order])
    permuted = TokenizedCells(
        np.concatenate(ids),
        tokens.offsets,
        tokens.obs,
        values=np.concatenate(values),
        vocabulary=tokens.vocabulary,
        metadata=tokens.metadata,
    )
    original = {m.cell: m.attention for m in model.attention(tokens)}
    for cell_map in model.attention(permuted):
        order = permutations[cell_map.cell]
        np.testing.assert_allclose(
            cell_map.attention, original[cell_map.cell][np.ix_(order, order)], atol=1e-5
        )
    np.testing.assert_allclose(model.predict_proba(permuted), model.predict_proba(tokens), atol=1e-5)


def test_embedding_layers(make_tokens, make_context):
    tokens = make_tokens()
    model = CelluFormer(**TINY).fit(make_context(tokens, epochs=2))
    network = model.network_
    # layer 0: mean over genes of embedding x value, computed by hand
    expected = []
    with torch.no_grad():
        for cell in range(tokens.n_cells):
            ids, values = tokens.cell(cell)
            vectors = (
                network.embedding.weight[torch.tensor(ids, dtype=torch.long)] * torch.tensor(values)[:, None]
            )
            expected.append(vectors.mean(0).numpy())
    np.testing.assert_allclose(model.embed(tokens, layer=0), np.array(expected), atol=1e-6)
    # the default embedding is the classifier's input
    with torch.no_grad():
        logits = network.classifier(torch.from_numpy(model.embed(tokens)))
    np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), model.predict_proba(tokens), atol=1e-5)


def test_early_stopping_restores_best_and_stops(make_tokens, make_context):
    tokens = make_tokens(n_cells=24)
    # a learning rate large enough to overshoot: the validation loss is best at epoch 5 of this seed,
    # then rises (0.021 -> 0.049 -> 0.263 -> 0.48)
    settings = {"learning_rate": 0.03, "validation_fraction": 0.3}
    stopped = CelluFormer(**TINY).fit(make_context(tokens, epochs=12, early_stopping_patience=3, **settings))
    val_loss = [epoch["train/val_loss"] for epoch in stopped.history_]
    best = int(np.argmin(val_loss)) + 1
    assert 1 < best < len(val_loss) and val_loss[-1] > 2 * val_loss[best - 1], val_loss
    assert len(val_loss) == best + 3, "stops once the loss has not improved for `patience` epochs"
    assert "train/val_accuracy" in stopped.history_[0]
    # Reference: the same run trained for exactly `best` epochs (the best epoch's checkpoint).
    reference = CelluFormer(**TINY).fit(make_context(tokens, epochs=best, **settings))
    restored = stopped.network_.state_dict()
    for name, weights in reference.network_.state_dict().items():
        assert torch.equal(restored[name], weights), name
    np.testing.assert_array_equal(stopped.predict_proba(tokens), reference.predict_proba(tokens))


def test_trains_only_on_the_train_split(make_tokens, make_context):
    tokens = make_tokens(n_cells=32)
    flipped = tokens.obs.copy()
    flipped["split"] = ["train"] * 24 + ["test"] * 8
    # test cells carry the wrong label; a model that trained on them could not learn the marker
    flipped.loc[flipped.index[24:], "label"] = np.where(
        flipped["label"].iloc[24:] == "case", "control", "case"
    )
    tokens = TokenizedCells(
        tokens.input_ids,
        tokens.offsets,
        flipped,
        values=tokens.values,
        vocabulary=tokens.vocabulary,
        metadata=tokens.metadata,
    )
    model = CelluFormer(**TINY).fit(make_context(tokens))
    predicted = model.predict(tokens)
    labels = flipped["label"].to_numpy()
    assert np.mean(predicted[:24] == labels[:24]) == 1.0
    assert np.mean(predicted[24:] == labels[24:]) == 0.0
