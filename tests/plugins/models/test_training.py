"""The shared training loop's pieces against reference implementations."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from grnx_core import GrnxError, RunContext
from grnx_plugins.models import _training as training


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine", "polynomial"])
def test_schedules_follow_the_hugging_face_formulas(kind):
    """transformers' schedules (get_scheduler), checked against their closed forms: linear warm-up,
    then constant, linear to 0, half a cosine, or polynomial power 1 down to lr_end 1e-7 (the
    defaults of get_polynomial_decay_schedule_with_warmup, which the former hand-written code used)."""
    import math

    warmup, total, lr, lr_end = 7, 40, 3e-4, 1e-7
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    config = training.train_config(None, scheduler=kind, warmup_steps=warmup, learning_rate=lr)
    scheduler = training.make_scheduler(optimizer, config, total)
    for step in range(total + 1):
        if step < warmup:
            expected = lr * step / warmup
        else:
            progress = (step - warmup) / (total - warmup)
            expected = {
                "constant": lr,
                "linear": lr * (1 - progress),
                "cosine": lr * 0.5 * (1 + math.cos(math.pi * progress)),
                "polynomial": (lr - lr_end) * (1 - progress) + lr_end,
            }[kind]
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15), step
        optimizer.step()
        scheduler.step()


def test_balanced_class_weights_match_scikit_learn():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0] * 7 + [1] * 2 + [3] * 11)  # class 2 absent from training
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 3]), y=labels)
    got = training.class_weight_vector(labels, 4, "balanced")
    np.testing.assert_allclose(got[[0, 1, 3]], expected)
    # n / (n_classes_present * count): the formula itself
    np.testing.assert_allclose(got, [20 / (3 * 7), 20 / (3 * 2), 0.0, 20 / (3 * 11)])
    assert training.class_weight_vector(labels, 4, "none") is None


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
    with pytest.raises(GrnxError, match=r"train.scheduler: .*got 'exponential'"):
        training.train_config(None, scheduler="exponential")


def test_train_config_is_the_core_train_settings():
    from grnx_core.recipe import TrainSettings

    settings = TrainSettings(
        epochs=4,
        scheduler="polynomial",
        early_stopping_patience=2,
        max_grad_norm=None,
        freeze_layers=3,
        class_weights="balanced",
    )
    assert training.train_config(RunContext(train_settings=settings)) is settings
    assert training.train_config(None) == TrainSettings()
    assert training.train_config(None, precision="bf16").precision == "bf16"


def test_macro_f1_counts_classes_of_either_array():
    # class 0: tp 1, fn 1 -> F1 2/3; class 1: tp 2, fp 1, fn 1 -> 2/3; class 2 (never true,
    # predicted once) -> 0; macro = their mean
    targets, predictions = np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 2])
    assert training.macro_f1(targets, predictions) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("learning_rate", float("inf"), r"train.learning_rate: .*finite.*got inf"),
        ("learning_rate", float("nan"), r"train.learning_rate: .*finite.*got nan"),
        ("learning_rate", 0.0, r"train.learning_rate: .*greater than 0"),
        ("weight_decay", float("inf"), r"train.weight_decay: .*finite"),
        ("max_grad_norm", float("nan"), r"train.max_grad_norm: .*finite"),
        ("gradient_accumulation_steps", 0, r"train.gradient_accumulation_steps: .*greater than or equal"),
        ("precision", "fp8", r"train.precision: .*got 'fp8'"),
    ],
)
def test_non_finite_train_settings_are_refused(setting, value, message):
    """YAML's .inf and .nan pass a "> 0" check; they would train a NaN model."""
    with pytest.raises(GrnxError, match=message):
        training.train_config(RunContext(train_settings=SimpleNamespace(**{setting: value})))
    assert training.train_config(None, max_grad_norm=None).max_grad_norm is None  # null: no clipping


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
        config=training.train_config(None, batch_size=4, device="cpu", **config),
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
    config = training.train_config(None, batch_size=4, device="cpu", epochs=1, max_grad_norm=None)
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
