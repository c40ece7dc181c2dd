"""The shared training loop's pieces against reference implementations."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from grnx_core import GrnxError, RunContext
from grnx_plugins.models import _training as training


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine", "polynomial"])
def test_schedules_match_hugging_face(kind):
    from transformers import get_scheduler

    warmup, total, lr = 7, 40, 3e-4
    name = "constant_with_warmup" if kind == "constant" else kind
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    reference = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    multiplier = training.lr_multiplier(kind, warmup, total, lr)
    for step in range(total + 1):
        assert reference.lr_lambdas[0](step) == pytest.approx(multiplier(step), rel=1e-9, abs=1e-12), step


def test_balanced_class_weights_match_scikit_learn():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0] * 7 + [1] * 2 + [2] * 11)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    np.testing.assert_allclose(training.class_weight_vector(labels, 3, "balanced"), expected)
    assert training.class_weight_vector(labels, 3, "none") is None


def test_bucketed_batches_cover_every_item_once_and_cut_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, size=1000)
    batches = training.bucketed_batches(np.arange(1000), lengths, 16, np.random.default_rng(1))
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(1000))
    padded = sum(len(b) * lengths[b].max() for b in batches)
    shuffled = np.random.default_rng(1).permutation(1000)
    unbucketed = sum(16 * lengths[shuffled[i : i + 16]].max() for i in range(0, 1000, 16))
    assert padded < 0.6 * unbucketed
    # same generator state, same batches (deterministic for a seed)
    again = training.bucketed_batches(np.arange(1000), lengths, 16, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))


def test_validation_split_is_stratified_and_keeps_every_class_in_training():
    labels = np.array([0] * 50 + [1] * 10 + [2] * 1)
    train_idx, val_idx = training.validation_split(labels, np.arange(61), 0.2, np.random.default_rng(0))
    assert np.intersect1d(train_idx, val_idx).size == 0
    assert len(train_idx) + len(val_idx) == 61
    assert np.bincount(labels[val_idx], minlength=3).tolist() == [10, 2, 0]


def test_train_config_reads_the_recipe_and_rejects_bad_values():
    context = RunContext(
        train_settings=SimpleNamespace(
            epochs=2,
            batch_size=4,
            learning_rate=0.1,
            scheduler="cosine",
            early_stopping_patience=None,
        )
    )
    config = training.train_config(context)
    assert (config.epochs, config.batch_size, config.learning_rate, config.scheduler) == (2, 4, 0.1, "cosine")
    assert config.early_stopping_patience is None and config.optimizer == "adamw"
    with pytest.raises(GrnxError, match="scheduler"):
        training.TrainConfig(scheduler="exponential")


def test_train_config_reads_the_core_train_settings():
    from grnx_core.recipe import TrainSettings

    settings = TrainSettings(
        epochs=4,
        scheduler="polynomial",
        early_stopping_patience=2,
        max_grad_norm=None,
        freeze_layers=3,
        class_weights="balanced",
    )
    config = training.train_config(RunContext(train_settings=settings))
    assert (config.epochs, config.scheduler, config.early_stopping_patience) == (4, "polynomial", 2)
    assert config.max_grad_norm is None and config.freeze_layers == 3 and config.class_weights == "balanced"
    assert config.optimizer == settings.optimizer


def test_macro_f1_matches_scikit_learn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    targets, predictions = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    assert training.macro_f1(targets, predictions) == pytest.approx(
        f1_score(targets, predictions, average="macro")
    )


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("learning_rate", float("inf"), r"train.learning_rate must be a finite number > 0.*got inf"),
        ("learning_rate", float("nan"), r"train.learning_rate must be a finite number > 0.*got nan"),
        ("learning_rate", 0.0, r"train.learning_rate must be a finite number > 0"),
        ("weight_decay", float("inf"), r"train.weight_decay must be a finite number >= 0"),
        ("max_grad_norm", float("nan"), r"train.max_grad_norm must be a finite number > 0.*or null"),
    ],
)
def test_non_finite_train_settings_are_refused(setting, value, message):
    """YAML's .inf and .nan pass a "> 0" check; they would train a NaN model."""
    with pytest.raises(GrnxError, match=message):
        training.TrainConfig(**{setting: value})
    assert training.TrainConfig(max_grad_norm=None).max_grad_norm is None  # null disables clipping


class _LinearTask(training.Task):
    """Regression of y = 2x with a one-weight model; ``nan_at`` poisons the loss of one batch."""

    def __init__(self, n, nan_at=None):
        self.x = torch.linspace(-1, 1, n)[:, None]
        self.nan_at, self.calls = nan_at, 0

    def batch(self, module, indices, training):
        if training:
            self.calls += 1
        prediction = module(self.x[indices])
        loss = ((prediction - 2 * self.x[indices]) ** 2).mean()
        if training and self.calls == self.nan_at:
            loss = loss * float("nan")
        return _BatchResult(loss=loss, n_items=len(indices))


_BatchResult = training.BatchResult  # Task.batch's argument ``training`` hides the module name


def _train(task, n, **config):
    torch.manual_seed(0)
    module = torch.nn.Linear(1, 1, bias=False)
    return training.train(
        module,
        task,
        train_idx=np.arange(n),
        val_idx=np.zeros(0, dtype=np.int64),
        config=training.TrainConfig(batch_size=4, device="cpu", **config),
        context=None,
        rng=np.random.default_rng(0),
        device=torch.device("cpu"),
    )


def test_a_nan_loss_stops_training_with_the_epoch_and_batch():
    history = _train(_LinearTask(16), 16, epochs=2, learning_rate=0.1)
    assert len(history) == 2 and np.isfinite(history[-1]["train/loss"])  # the control trains
    with pytest.raises(GrnxError, match=r"loss is nan at epoch 2, batch 3 of 4.*Lower train.learning_rate"):
        _train(_LinearTask(16, nan_at=7), 16, epochs=2, learning_rate=0.1)


def test_weights_that_overflow_stop_training():
    """A finite but huge learning rate without clipping: the next batch's loss overflows."""
    with pytest.raises(GrnxError, match=r"loss is inf at epoch 1, batch 2 of 4"):
        _train(_LinearTask(16), 16, epochs=3, learning_rate=1e30, max_grad_norm=None, optimizer="adam")


def test_non_finite_weights_after_the_last_batch_stop_training():
    """No later batch would see them: the epoch's end checks the weights themselves."""
    config = training.TrainConfig(batch_size=4, device="cpu", epochs=1, max_grad_norm=None)
    config.learning_rate = float("inf")  # past validation, as a model's own override could
    module = torch.nn.Linear(1, 1, bias=False)
    with pytest.raises(GrnxError, match=r"weights are no longer finite at epoch 1, its last batch"):
        training.train(
            module,
            _LinearTask(4),
            train_idx=np.arange(4),
            val_idx=np.zeros(0, dtype=np.int64),
            config=config,
            context=None,
            rng=np.random.default_rng(0),
            device=torch.device("cpu"),
        )
