"""The one training loop every grnx model uses: splits, bucketed batches, schedules, early stopping.

A model describes its objective as a :class:`Task` (how to compute the loss of a batch of items)
and hands its ``torch.nn.Module`` to :func:`train`, which reads the recipe's ``train`` settings
(:class:`TrainConfig`), logs per-epoch metrics through ``context.logger`` and returns the history.
Imported only inside model methods: this module imports torch.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from grnx_core.errors import DataError, GrnxError
from grnx_core.progress import progress

if TYPE_CHECKING:
    from grnx_core.context import RunContext


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """The recipe's ``train`` section as the loop uses it (``grnx_core.recipe.TrainSettings``'s
    field names and defaults; used as they are when a component runs outside a recipe)."""

    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    validation_fraction: float = 0.1
    early_stopping_patience: int | None = None
    class_weights: str = "none"
    scheduler: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    device: str = "auto"
    optimizer: str = "adamw"
    #: encoder layers to freeze when fine-tuning (models that support it; their own param wins)
    freeze_layers: int = 0

    def __post_init__(self) -> None:
        choices = {
            "class_weights": ("none", "balanced"),
            "scheduler": ("constant", "linear", "cosine", "polynomial"),
            "device": ("auto", "cpu", "cuda"),
            "optimizer": ("adam", "adamw"),
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise GrnxError(f"train.{name} must be one of {', '.join(allowed)}; got {value!r}.")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise GrnxError(f"train.validation_fraction must be in [0, 1); got {self.validation_fraction}.")
        if self.epochs < 0 or self.batch_size < 1:
            raise GrnxError(
                f"train.epochs must be >= 0 and train.batch_size >= 1; got {self.epochs} and "
                f"{self.batch_size}."
            )
        # YAML reads .inf and .nan as floats: they pass "> 0" checks and train a NaN model.
        for name, value, zero_ok, example in (
            ("learning_rate", self.learning_rate, False, "1e-4"),
            ("weight_decay", self.weight_decay, True, "0.01"),
            ("max_grad_norm", self.max_grad_norm, False, "1.0, or null to disable clipping"),
        ):
            if value is None and name == "max_grad_norm":
                continue
            number = float(value) if isinstance(value, (int, float)) else math.nan
            if not (math.isfinite(number) and (number > 0 or (zero_ok and number == 0))):
                raise GrnxError(
                    f"train.{name} must be a finite number {'>=' if zero_ok else '>'} 0 (e.g. {example}); "
                    f"got {value!r}. Set it in the recipe's train section."
                )


def train_config(context: RunContext | None, **overrides: Any) -> TrainConfig:
    """The train settings of the run (``context.train``), defaults where the recipe has none."""
    settings: Any = None
    if context is not None:
        try:
            settings = context.train
        except ImportError:  # the recipe module is not available: use the defaults
            settings = None
    values: dict[str, Any] = {}
    for field in fields(TrainConfig):
        if settings is not None and getattr(settings, field.name, None) is not None:
            value = getattr(settings, field.name)
            values[field.name] = getattr(value, "value", value)  # enums -> their value
        elif settings is not None and field.name in ("early_stopping_patience", "max_grad_norm"):
            values[field.name] = None
    values.update(overrides)
    return TrainConfig(**values)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise GrnxError("train.device is 'cuda' but torch sees no CUDA device. Use device: auto or cpu.")
        return torch.device("cuda")
    return torch.device("cpu")


@contextlib.contextmanager
def deterministic(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch and, on CPU, ask for deterministic kernels; restore the global flag afterwards."""
    torch.manual_seed(seed)
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


# ---------------------------------------------------------------------------------------------
# Splits and batches
# ---------------------------------------------------------------------------------------------


def validation_split(
    labels: np.ndarray | None, candidates: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``candidates`` into (train, validation), stratified by label when labels are given.

    Each class keeps at least one training item; classes with one item go to training only.
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    if fraction <= 0 or len(candidates) < 2:
        return candidates, np.zeros(0, dtype=np.int64)
    groups = (
        [candidates]
        if labels is None
        else [candidates[labels[candidates] == value] for value in np.unique(labels[candidates])]
    )
    validation = []
    for group in groups:
        shuffled = rng.permutation(group)
        n_val = min(int(round(fraction * len(group))), len(group) - 1)
        validation.append(shuffled[:n_val])
    validation_idx = np.sort(np.concatenate(validation)) if validation else np.zeros(0, np.int64)
    if len(validation_idx) == 0:
        validation_idx = np.sort(rng.permutation(candidates)[:1])
    train_idx = np.setdiff1d(candidates, validation_idx)
    return train_idx, validation_idx


def bucketed_batches(
    indices: np.ndarray,
    lengths: np.ndarray | None,
    batch_size: int,
    rng: np.random.Generator | None,
    bucket_batches: int = 50,
) -> list[np.ndarray]:
    """Batches of similar-length items, so little compute goes to padding.

    With ``rng`` the items are shuffled, then sorted by length inside windows of
    ``bucket_batches`` batches, and the batch order is shuffled (randomness is kept while padding
    is small). Without ``rng`` the items are sorted by length globally (inference).
    """
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        return []
    if rng is None:
        order = indices if lengths is None else indices[np.argsort(lengths[indices], kind="stable")]
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    order = rng.permutation(indices)
    batches: list[np.ndarray] = []
    window = batch_size * bucket_batches
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        if lengths is not None:
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    permutation = rng.permutation(len(batches))
    return [batches[i] for i in permutation]


def class_weight_vector(labels: np.ndarray, n_classes: int, mode: str) -> np.ndarray | None:
    """``balanced``: n / (n_classes * count_c), as scikit-learn's ``compute_class_weight``."""
    if mode == "none":
        return None
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.zeros(n_classes)
    present = counts > 0
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights


# ---------------------------------------------------------------------------------------------
# Schedules and optimisers
# ---------------------------------------------------------------------------------------------


def lr_multiplier(kind: str, warmup_steps: int, total_steps: int, lr: float) -> Callable[[int], float]:
    """Hugging Face's schedule shapes: linear warm-up, then constant / linear / cosine / polynomial.

    Polynomial follows ``get_polynomial_decay_schedule_with_warmup`` with power 1 and an end
    learning rate of 1e-7.
    """
    total_steps = max(total_steps, 1)
    lr_end = 1e-7

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return float(step) / float(max(1, warmup_steps))
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / float(max(1, total_steps - warmup_steps))
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if lr <= lr_end:
            return 1.0
        return ((lr - lr_end) * (1.0 - progress) + lr_end) / lr

    return multiplier


def make_optimizer(parameters: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if not parameters:
        raise GrnxError("Every parameter of the model is frozen; nothing to train. Lower freeze_layers.")
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.Adam(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class BatchResult:
    """What a task returns for one batch: the loss, and predictions for accuracy when it has them."""

    loss: torch.Tensor
    n_items: int
    predictions: np.ndarray | None = None
    targets: np.ndarray | None = None


class Task:
    """A training objective over items ``0..n-1`` (cells).

    ``lengths`` (optional) drives length bucketing; ``batch(module, indices, training)`` computes
    the loss of those items. ``labels`` are the classes used to stratify the validation split.
    """

    lengths: np.ndarray | None = None
    labels: np.ndarray | None = None

    def batch(self, module: torch.nn.Module, indices: np.ndarray, training: bool) -> BatchResult:
        raise NotImplementedError


def macro_f1(targets: np.ndarray, predictions: np.ndarray) -> float:
    scores = []
    for value in np.unique(np.concatenate([targets, predictions])):
        tp = np.sum((predictions == value) & (targets == value))
        fp = np.sum((predictions == value) & (targets != value))
        fn = np.sum((predictions != value) & (targets == value))
        denominator = 2 * tp + fp + fn
        scores.append(2 * tp / denominator if denominator else 0.0)
    return float(np.mean(scores)) if scores else float("nan")


def evaluate(module: torch.nn.Module, task: Task, indices: np.ndarray, batch_size: int) -> dict[str, float]:
    """Mean loss (and accuracy / macro-F1 when the task predicts classes) over ``indices``."""
    module.eval()
    total, count = 0.0, 0
    predictions, targets = [], []
    with torch.no_grad():
        for batch in bucketed_batches(indices, task.lengths, batch_size, None):
            result = task.batch(module, batch, training=False)
            total += float(result.loss) * result.n_items
            count += result.n_items
            if result.predictions is not None:
                predictions.append(result.predictions)
                targets.append(result.targets)
    metrics = {"loss": total / max(count, 1)}
    if predictions:
        predicted, expected = np.concatenate(predictions), np.concatenate(targets)
        metrics["accuracy"] = float(np.mean(predicted == expected)) if len(expected) else float("nan")
        metrics["macro_f1"] = macro_f1(expected, predicted)
    return metrics


def diverged(what: str, epoch: int, where: str, config: TrainConfig) -> GrnxError:
    """Training produced NaN or inf: stop with the settings to change rather than save a NaN model."""
    return GrnxError(
        f"Training diverged: {what} at epoch {epoch}, {where} (train.learning_rate {config.learning_rate:g}, "
        f"max_grad_norm {config.max_grad_norm}, batch_size {config.batch_size}). Lower train.learning_rate "
        f"(e.g. 10x), keep train.max_grad_norm set (e.g. 1.0), add warm-up (train.warmup_steps), and check "
        f"that the model's input holds no NaN or inf values (normalise and log1p counts first)."
    )


def train(
    module: torch.nn.Module,
    task: Task,
    *,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    config: TrainConfig,
    context: RunContext | None,
    rng: np.random.Generator,
    device: torch.device,
    prefix: str = "train",
) -> list[dict[str, float]]:
    """Train ``module`` on ``task``; returns one metrics dict per epoch.

    Per epoch it logs ``<prefix>/loss`` (mean training loss), ``<prefix>/learning_rate`` and, with
    a validation set, ``<prefix>/val_loss``, ``<prefix>/val_accuracy``, ``<prefix>/val_macro_f1``.
    With ``early_stopping_patience`` it stops once the validation loss (the training loss when
    there is no validation set) has not improved for that many epochs, and restores the weights
    of the best epoch. A NaN or inf loss, or weights that stop being finite, end training with a
    GrnxError naming the epoch and batch.
    """
    if len(train_idx) == 0:
        raise DataError("No cells left to train on after the train/validation split.")
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(parameters, config)
    steps_per_epoch = math.ceil(len(train_idx) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_multiplier(
            config.scheduler, config.warmup_steps, steps_per_epoch * config.epochs, config.learning_rate
        ),
    )
    logger = context.logger if context is not None else None
    history: list[dict[str, float]] = []
    best_loss, best_state, stale = math.inf, None, 0
    with progress(total=config.epochs, desc=prefix, unit="epoch") as epochs_bar:
        for epoch in range(1, config.epochs + 1):
            started = time.perf_counter()
            module.train()
            total, count = 0.0, 0
            batches = bucketed_batches(train_idx, task.lengths, config.batch_size, rng)
            with progress(
                total=len(train_idx), desc=f"{prefix} epoch {epoch}/{config.epochs}", unit="cell"
            ) as bar:
                for number, batch in enumerate(batches, start=1):
                    result = task.batch(module, batch, training=True)
                    loss = float(result.loss.detach())
                    if not math.isfinite(loss):
                        raise diverged(
                            f"the training loss is {loss}", epoch, f"batch {number} of {len(batches)}", config
                        )
                    optimizer.zero_grad(set_to_none=True)
                    result.loss.backward()
                    if config.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    total += loss * result.n_items
                    count += result.n_items
                    bar.update(result.n_items, loss=total / max(count, 1))
            if not all(bool(torch.isfinite(p).all()) for p in parameters):
                raise diverged("the model's weights are no longer finite", epoch, "its last batch", config)
            metrics = {
                f"{prefix}/loss": total / max(count, 1),
                f"{prefix}/learning_rate": float(scheduler.get_last_lr()[0]),
            }
            if len(val_idx):
                for name, value in evaluate(module, task, val_idx, config.batch_size).items():
                    metrics[f"{prefix}/val_{name}"] = value
                if not math.isfinite(metrics[f"{prefix}/val_loss"]):
                    loss = metrics[f"{prefix}/val_loss"]
                    raise diverged(f"the validation loss is {loss}", epoch, "validation", config)
            metrics[f"{prefix}/epoch_seconds"] = time.perf_counter() - started
            history.append(metrics)
            if logger is not None:
                logger.log_metrics(metrics, step=epoch)
            shown = {"loss": metrics[f"{prefix}/loss"]}
            if f"{prefix}/val_loss" in metrics:
                shown["val_loss"] = metrics[f"{prefix}/val_loss"]
            epochs_bar.update(1, **shown)
            monitored = metrics.get(f"{prefix}/val_loss", metrics[f"{prefix}/loss"])
            if config.early_stopping_patience is not None:
                if monitored < best_loss - 1e-12:
                    best_loss, stale = monitored, 0
                    best_state = copy.deepcopy({k: v.detach().cpu() for k, v in module.state_dict().items()})
                else:
                    stale += 1
                    if stale >= config.early_stopping_patience:
                        break
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return history
