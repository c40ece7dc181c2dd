"""The one training loop every grnx model uses, on ``accelerate.Accelerator``.

A model describes its objective as a :class:`Task` (the loss of a batch of items) and hands its
``torch.nn.Module`` to :func:`train`, which reads the recipe's ``train`` section
(``grnx_core.recipe.TrainSettings``, the only definition of those settings), logs per-epoch metrics
through ``context.logger`` and returns the history. Imported only inside model methods: it imports
torch.

What comes from the libraries: device placement, autocast (``precision``), fp16 loss scaling,
data-parallel wrapping and gradient synchronisation (``accelerate``); learning-rate schedules
(``transformers.get_scheduler``); macro-F1 and balanced class weights (scikit-learn). What stays
here, and why grnx keeps its own loop rather than ``transformers.Trainer``: per-epoch train and
validation metrics go to MLflow through ``context.logger`` (cached runs replay them); a
:class:`Task` serves token models and AnnData models alike (no Trainer dataset/collator shape);
length-bucketed batches; the divergence checks; checkpoints that resume to the very same weights;
and bit-for-bit determinism on CPU for a seed (two runs give equal weights, checked in
tests/plugins/models/test_training_scale.py). Under ``torchrun`` / ``accelerate launch`` each
optimiser step's cells are split between the processes so that n processes train like one
process with n times the batch, and validation metrics are gathered over all of them (checked
on CPU with gloo in tests/plugins/models/test_training_ddp.py).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from grnx_core.errors import DataError, GrnxError
from grnx_core.progress import progress
from grnx_core.progress import set_enabled as set_progress
from grnx_core.recipe import TrainSettings

if TYPE_CHECKING:
    from accelerate import Accelerator

    from grnx_core.context import RunContext


# ---------------------------------------------------------------------------------------------
# Settings, device, threads
# ---------------------------------------------------------------------------------------------


def train_config(context: RunContext | None, **overrides: Any) -> TrainSettings:
    """The run's train settings (``context.train``) as a validated ``TrainSettings``.

    Anything else that carries the same field names (a test's namespace) is validated into one;
    a bad value is a GrnxError naming ``train.<field>``. ``epochs: 0`` (refused in recipes) is let
    through here: outside a recipe it means "build the model, train nothing", e.g. to load a
    checkpoint as it is.
    """
    from pydantic import ValidationError

    settings: Any = context.train if context is not None else None
    if isinstance(settings, TrainSettings) and not overrides:
        return settings
    names = TrainSettings.model_fields
    values = {name: getattr(settings, name) for name in names if hasattr(settings, name)}
    values = {name: getattr(value, "value", value) for name, value in values.items()}  # enums
    values.update(overrides)
    epochs = values.get("epochs")
    no_epochs = epochs == 0
    if no_epochs:
        values["epochs"] = 1
    try:
        config = TrainSettings.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(
            f"train.{'.'.join(map(str, problem['loc']))}: {problem['msg']}, got {problem.get('input')!r}"
            for problem in error.errors()
        )
        raise GrnxError(f"Invalid train settings: {problems}. Fix the recipe's train section.") from None
    if no_epochs:
        config.epochs = 0
    return config


def resolve_device(name: str) -> torch.device:
    """The device to train on; under ``torchrun``/``accelerate launch`` the process's own GPU."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise GrnxError("train.device is 'cuda' but torch sees no CUDA device. Use device: auto or cpu.")
        local_rank = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(local_rank)) if local_rank is not None else torch.device("cuda")
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


def make_accelerator(config: TrainSettings, device: torch.device) -> Accelerator:
    """An ``Accelerator`` for ``config.precision`` on ``device``.

    accelerate keeps one process-wide state; in a single process (not launched) it is reset so
    that runs with different precisions can follow each other (a sweep, the tests). Under
    ``torchrun`` / ``accelerate launch`` it joins the launched process group (NCCL on GPUs, gloo
    on CPUs).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    if config.precision == "fp16" and device.type != "cuda":
        raise GrnxError(
            "train.precision is fp16, which needs a CUDA GPU (loss scaling); this run trains on "
            f"{device.type}. Use precision: bf16 (CPU autocast) or fp32."
        )
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[config.precision]
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched and PartialState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed)
    except ValueError as error:  # a launched run whose accelerate config says otherwise
        raise GrnxError(
            f"accelerate refused train.precision {config.precision} on {device}: {error} Launch with "
            f"the same precision (accelerate launch --mixed_precision {mixed}) or change the recipe."
        ) from None


# ---------------------------------------------------------------------------------------------
# Splits and batches
# ---------------------------------------------------------------------------------------------


def validation_split(
    labels: np.ndarray | None,
    candidates: np.ndarray,
    fraction: float,
    rng: np.random.Generator,
    donors: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``candidates`` into (train, validation), stratified by label when labels are given.

    Without ``donors``: cells are drawn per class; each class keeps at least one training item and
    classes with one item go to training only. With ``donors`` (one value per item, e.g.
    ``obs[donor_key]``): whole donors are held out, so validation measures new donors as a test set
    does. Donors are grouped by their most frequent label; in each group donors are drawn until
    about ``fraction`` of the group's cells are held out, always leaving one donor in training.
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    if fraction <= 0 or len(candidates) < 2:
        return candidates, np.zeros(0, dtype=np.int64)
    if donors is not None:
        return _donor_split(labels, candidates, fraction, rng, np.asarray(donors, dtype=object))
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


def _donor_split(
    labels: np.ndarray | None,
    candidates: np.ndarray,
    fraction: float,
    rng: np.random.Generator,
    donors: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    names = donors[candidates].astype(str)
    unique = np.unique(names)
    if labels is None:
        donor_label = dict.fromkeys(unique, 0)
    else:
        donor_label = {}
        for donor in unique:
            values, counts = np.unique(labels[candidates[names == donor]], return_counts=True)
            donor_label[donor] = int(values[np.argmax(counts)])
    held: list[str] = []
    for label in sorted(set(donor_label.values())):
        group = [d for d in unique if donor_label[d] == label]
        if len(group) < 2:
            continue
        group_cells = int(np.isin(names, group).sum())
        taken = 0
        for donor in rng.permutation(np.array(group, dtype=object))[:-1]:
            if taken >= fraction * group_cells:
                break
            held.append(str(donor))
            taken += int(np.sum(names == donor))
    if not held:
        raise DataError(
            f"train.validation_fraction {fraction} holds out whole donors (data.donor_key is set), but "
            f"no label has two or more donors among the {len(unique)} training donors, so no donor "
            f"can be held out. Set train.validation_fraction: 0, or unset data.donor_key for a "
            f"cell-level split (optimistic: validation then shares donors with training)."
        )
    in_validation = np.isin(names, held)
    return np.sort(candidates[~in_validation]), np.sort(candidates[in_validation])


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
    """``balanced``: scikit-learn's ``compute_class_weight`` over the classes present (0 for absent)."""
    if mode == "none":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    weights = np.zeros(n_classes)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return weights


# ---------------------------------------------------------------------------------------------
# Optimisers and schedules
# ---------------------------------------------------------------------------------------------

#: recipe name -> transformers.get_scheduler name (all with linear warm-up; polynomial: power 1,
#: end learning rate 1e-7, the library's defaults)
SCHEDULES = {
    "constant": "constant_with_warmup",
    "linear": "linear",
    "cosine": "cosine",
    "polynomial": "polynomial",
}


def make_optimizer(parameters: list[torch.nn.Parameter], config: TrainSettings) -> torch.optim.Optimizer:
    if not parameters:
        raise GrnxError("Every parameter of the model is frozen; nothing to train. Lower freeze_layers.")
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.Adam(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainSettings, total_steps: int) -> Any:
    """``transformers.get_scheduler`` for ``train.scheduler`` over ``total_steps`` optimiser steps."""
    from transformers import get_scheduler

    return get_scheduler(
        SCHEDULES[config.scheduler],
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=max(total_steps, 1),
    )


# ---------------------------------------------------------------------------------------------
# Tasks and evaluation
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
    The random generators a task keeps as attributes (torch or numpy, e.g. a masking generator)
    are saved in checkpoints and restored on resume.
    """

    lengths: np.ndarray | None = None
    labels: np.ndarray | None = None

    def batch(self, module: torch.nn.Module, indices: np.ndarray, training: bool) -> BatchResult:
        raise NotImplementedError

    def random_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for name, value in vars(self).items():
            if isinstance(value, torch.Generator):
                state[name] = value.get_state()
            elif isinstance(value, np.random.Generator):
                state[name] = value.bit_generator.state
        return state

    def set_random_state(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            current = getattr(self, name)
            if isinstance(current, torch.Generator):
                current.set_state(value)
            else:
                current.bit_generator.state = value


def bare_module(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (the module itself otherwise).

    Under a multi-process launch :meth:`Task.batch` receives the wrapper: call it for the forward
    pass (that is what synchronises gradients), and read the model's own attributes (its layers,
    for a weight penalty) from ``bare_module(module)``; the wrapper does not forward them. The
    same as ``accelerate``'s ``Accelerator.unwrap_model`` with the autocast wrapper kept.
    """
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


def process_share(step: np.ndarray, n_processes: int, process_index: int) -> np.ndarray:
    """The cells of one optimiser step that process ``process_index`` of ``n_processes`` takes.

    Contiguous, near-equal parts (``numpy.array_split``): the step was drawn length-bucketed, so
    each part keeps similar lengths together. Every cell goes to exactly one process; a process
    may get none when the step has fewer cells than there are processes.
    """
    if n_processes == 1:
        return step
    return np.array_split(step, n_processes)[process_index]


def step_pieces(
    step: np.ndarray, batch_size: int, n_processes: int = 1, process_index: int = 0
) -> list[tuple[np.ndarray, float]]:
    """This process's forward passes of one optimiser step: (cells, weight of their mean loss).

    The process's share of the step runs in pieces of ``batch_size``; a piece's weight is
    ``n_processes x`` its share of the step's cells, so once DistributedDataParallel has
    averaged the gradients over the processes, the step's gradient is that of the mean loss over
    all its cells (for one process: accumulation equals the large batch). Every process runs the
    same number of pieces: one with fewer cells (an uneven last step) adds pieces of one cell
    weighted 0, so the processes stay in step in every exchange DDP makes.
    """
    share = process_share(step, n_processes, process_index)
    n_pieces = max(1, math.ceil(math.ceil(len(step) / n_processes) / batch_size))
    pieces = [
        (share[i : i + batch_size], len(share[i : i + batch_size]) * n_processes / len(step))
        for i in range(0, len(share), batch_size)
    ]
    return pieces + [(step[:1], 0.0)] * (n_pieces - len(pieces))


def counted_cells(pieces: list[tuple[np.ndarray, float]]) -> int:
    """The cells of a step's pieces that count (not the weight-0 padding)."""
    return sum(len(cells) for cells, weight in pieces if weight > 0)


def macro_f1(targets: np.ndarray, predictions: np.ndarray) -> float:
    """scikit-learn's macro-F1 over the classes in either array."""
    from sklearn.metrics import f1_score

    if len(targets) == 0:
        return float("nan")
    return float(f1_score(targets, predictions, average="macro", zero_division=0))


def evaluate(
    module: torch.nn.Module,
    task: Task,
    indices: np.ndarray,
    batch_size: int,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    accelerator: Accelerator | None = None,
) -> dict[str, float]:
    """Mean loss (and accuracy / macro-F1 when the task predicts classes) over ``indices``.

    Under a multi-process launch (``accelerator.num_processes > 1``) the batches are dealt out
    (batch ``i`` to process ``i mod n``) and every process's sums and predictions are gathered
    with ``accelerate.utils.gather_object``, so the metrics cover each cell exactly once, equal on
    every process. (``Accelerator.gather_for_metrics`` trims the padding that a prepared
    ``DataLoader`` adds to its last batch; these shards are exact, so there is nothing to trim.)
    """
    module.eval()
    batches = bucketed_batches(indices, task.lengths, batch_size, None)
    world = accelerator.num_processes if accelerator is not None else 1
    if world > 1:
        batches = batches[accelerator.process_index :: world]  # type: ignore[union-attr]
    total, count = 0.0, 0
    predictions, targets = [], []
    with torch.no_grad():
        for batch in batches:
            with autocast():
                result = task.batch(module, batch, training=False)
            total += float(result.loss) * result.n_items
            count += result.n_items
            if result.predictions is not None:
                predictions.append(result.predictions)
                targets.append(result.targets)
    if world > 1:
        from accelerate.utils import gather_object

        shards = gather_object([(total, count, predictions, targets)])
        total, count = sum(shard[0] for shard in shards), sum(shard[1] for shard in shards)
        predictions = [p for shard in shards for p in shard[2]]
        targets = [t for shard in shards for t in shard[3]]
    metrics = {"loss": total / max(count, 1)}
    if predictions:
        predicted, expected = np.concatenate(predictions), np.concatenate(targets)
        metrics["accuracy"] = float(np.mean(predicted == expected)) if len(expected) else float("nan")
        metrics["macro_f1"] = macro_f1(expected, predicted)
    return metrics


def diverged(what: str, epoch: int, where: str, config: TrainSettings) -> GrnxError:
    """Training produced NaN or inf: stop with the settings to change rather than save a NaN model."""
    return GrnxError(
        f"Training diverged: {what} at epoch {epoch}, {where} (train.learning_rate {config.learning_rate:g}, "
        f"max_grad_norm {config.max_grad_norm}, batch_size {config.batch_size}, precision "
        f"{config.precision}). Lower train.learning_rate (e.g. 10x), keep train.max_grad_norm set "
        f"(e.g. 1.0), add warm-up (train.warmup_steps), use precision fp32 or bf16 rather than fp16, "
        f"and check that the model's input holds no NaN or inf values (normalise and log1p counts first)."
    )


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def gradient_checkpointing(module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Recompute transformer blocks in the backward pass while the block runs.

    A Hugging Face model (Geneformer's BERT, reached directly or as ``module.hf``) uses its own
    ``gradient_checkpointing_enable``; grnx's encoder blocks (CelluFormer, scGPT) run through
    ``torch.utils.checkpoint`` (non-reentrant, RNG state preserved, so dropout draws and results
    equal a run without it). Other models (the MLP) have no blocks to checkpoint and are refused.
    """
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    from grnx_plugins.models._layers import EncoderLayer

    hf_models = [m for m in module.modules() if getattr(m, "supports_gradient_checkpointing", False)]
    hf_model = hf_models[0] if hf_models else None
    if hf_model is not None:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            yield
        finally:
            hf_model.gradient_checkpointing_disable()
        return
    blocks = [m for m in module.modules() if isinstance(m, EncoderLayer)]
    if not blocks:
        raise GrnxError(
            f"train.gradient_checkpointing is on, but {type(module).__name__} has no transformer "
            f"blocks to recompute (it is for the token models: geneformer, celluformer, scgpt). "
            f"Set train.gradient_checkpointing: false."
        )

    def checkpointed(block: EncoderLayer) -> Callable[..., torch.Tensor]:
        forward = block.forward

        def run(*args: Any, **kwargs: Any) -> torch.Tensor:
            if block.training and torch.is_grad_enabled():
                return checkpoint(forward, *args, use_reentrant=False, **kwargs)
            return forward(*args, **kwargs)

        return run

    for block in blocks:
        block.forward = checkpointed(block)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # back to the class's forward


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class LoopState:
    """Where the loop stands: what a checkpoint holds besides weights and optimiser."""

    epoch: int = 1  # the epoch to run next (or in progress)
    batches_done: int = 0  # optimiser steps already taken in that epoch
    step: int = 0  # optimiser steps in all
    total: float = 0.0  # running sum of the epoch's training loss x items
    count: int = 0
    epoch_started: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    best_loss: float = math.inf
    best_state: dict[str, torch.Tensor] | None = None
    stale: int = 0
    epoch_rng: dict[str, Any] | None = None  # the batch generator's state when the epoch began
    finished: bool = False


def fingerprint(
    config: TrainSettings, train_idx: np.ndarray, val_idx: np.ndarray, prefix: str, n_processes: int = 1
) -> str:
    """What must match for a checkpoint to continue this run (settings that change the result).

    The number of processes of a multi-process launch is part of it: it sets the cells of each
    optimiser step. (Left out for one process, so single-process checkpoints keep their
    fingerprint.)
    """
    ignored = {"resume", "checkpoint_every_steps", "gradient_checkpointing", "device"}
    settings = {k: v for k, v in config.model_dump(mode="json").items() if k not in ignored}
    identity: tuple[Any, ...] = (prefix, sorted(settings.items()))
    if n_processes > 1:
        identity += (("n_processes", n_processes),)
    digest = hashlib.sha256(repr(identity).encode())
    digest.update(np.ascontiguousarray(train_idx, dtype=np.int64).tobytes())
    digest.update(b"|")
    digest.update(np.ascontiguousarray(val_idx, dtype=np.int64).tobytes())
    return digest.hexdigest()


class Checkpoints:
    """One resumable checkpoint per training phase under ``<work_dir>/checkpoints/<prefix>/``.

    Written atomically (a temporary file renamed into place), so a run killed while saving keeps
    the previous checkpoint. Loaded with ``torch.load(weights_only=True)``: tensors and plain
    values only, no pickled code. Under a multi-process launch every process calls ``save`` at
    the same step (it gathers each process's random states: their dropout draws and masking
    differ) and the main process alone writes the file, which every process reads on resume (on
    several machines ``work_dir`` must be a shared folder).
    """

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.path = folder / CHECKPOINT_FILE
        self.fingerprint = fingerprint

    @classmethod
    def for_run(cls, context: RunContext | None, prefix: str, fingerprint: str) -> Checkpoints:
        work_dir = getattr(context, "work_dir", None)
        if work_dir is None:
            raise GrnxError(
                "train.resume / train.checkpoint_every_steps need a folder for checkpoints, but this "
                "run has none (context.work_dir is unset). Run the model through a recipe with the "
                "cache on, or give RunContext(work_dir=...) when calling fit directly."
            )
        return cls(Path(work_dir) / "checkpoints" / prefix, fingerprint)

    def save(
        self,
        state: LoopState,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        task: Task,
        rng: np.random.Generator,
        accelerator: Accelerator,
    ) -> None:
        from grnx_core.atomic import atomic_path

        by_process = None
        if accelerator.num_processes > 1:  # a collective: every process takes part
            from accelerate.utils import gather_object

            by_process = gather_object([own_random_states(task)])
        if not accelerator.is_main_process:
            return
        payload = {
            "fingerprint": self.fingerprint,
            "loop": {k: v for k, v in vars(state).items()},
            "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "batch_rng": rng.bit_generator.state,
            "task_rng": task.random_state(),
            "by_process": by_process,
        }
        with atomic_path(self.path) as temporary:
            torch.save(payload, temporary)

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        payload = torch.load(self.path, map_location="cpu", weights_only=True)
        if payload.get("fingerprint") != self.fingerprint:
            raise GrnxError(
                f"train.resume: the checkpoint {self.path} was written by a run with other train "
                f"settings or other training cells, so it cannot continue this one. Delete it to "
                f"start afresh, or restore the settings it was made with."
            )
        return payload


def own_random_states(task: Task) -> dict[str, Any]:
    """This process's random states (torch CPU and CUDA, the task's generators)."""
    return {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "task_rng": task.random_state(),
    }


def restore(
    payload: dict[str, Any],
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    task: Task,
    rng: np.random.Generator,
    accelerator: Accelerator,
) -> LoopState:
    module.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if payload["scaler"] is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(payload["scaler"])
    # A multi-process checkpoint holds each process's states (its fingerprint fixed their number).
    by_process = payload.get("by_process")
    own = by_process[accelerator.process_index] if by_process else payload
    torch.set_rng_state(own["torch_rng"])
    if own["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(own["cuda_rng"])
    rng.bit_generator.state = payload["batch_rng"]  # the batch order: the same on every process
    task.set_random_state(own["task_rng"])
    return LoopState(**payload["loop"])


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train(
    module: torch.nn.Module,
    task: Task,
    *,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    config: TrainSettings,
    context: RunContext | None,
    rng: np.random.Generator,
    device: torch.device,
    prefix: str = "train",
    on_step: Callable[[int, int], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``module`` on ``task``; returns one metrics dict per epoch.

    Per epoch it logs ``<prefix>/loss`` (mean training loss), ``<prefix>/learning_rate`` and, with
    a validation set, ``<prefix>/val_loss``, ``<prefix>/val_accuracy``, ``<prefix>/val_macro_f1``.
    With ``early_stopping_patience`` it stops once the validation loss (the training loss when
    there is no validation set) has not improved for that many epochs, and restores the weights
    of the best epoch. A NaN or inf loss, or weights that stop being finite, end training with a
    GrnxError naming the epoch and batch.

    One optimiser step covers ``batch_size x gradient_accumulation_steps`` cells: that many are
    drawn as one length-bucketed batch and run in pieces of ``batch_size``, each piece's loss
    weighted by its share of the cells, so accumulation equals the large batch (for mean losses).
    ``precision`` autocasts the forward passes (weights and optimiser stay float32).
    With ``resume`` (or ``checkpoint_every_steps``) the state is saved under
    ``context.work_dir/checkpoints/<prefix>/`` after every epoch (and every N steps); ``resume``
    continues from it and ends with the weights an uninterrupted run has. ``on_step(epoch, step)``
    runs after every optimiser step (and its checkpoint).
    Under ``torchrun`` / ``accelerate launch`` (data-parallel, ``accelerator.num_processes`` =
    n > 1) ``batch_size`` is per process: one optimiser step covers ``batch_size x
    gradient_accumulation_steps x n`` cells, drawn as one batch from the same seeded order on
    every process and split between them (:func:`step_pieces`); each piece's loss is weighted
    by ``n x`` its share of the step's cells, so the gradients DistributedDataParallel averages
    equal the single-process gradient of the whole step: no cell is dropped or repeated. The
    training loss, the NaN checks and the validation metrics are gathered over every process
    (the same values on each); only the main process logs metrics and writes checkpoints.
    """
    if len(train_idx) == 0:
        raise DataError("No cells left to train on after the train/validation split.")
    accelerator = make_accelerator(config, device)
    world, rank = accelerator.num_processes, accelerator.process_index
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(parameters, config)
    cells_per_step = config.batch_size * config.gradient_accumulation_steps * world
    steps_per_epoch = math.ceil(len(train_idx) / cells_per_step)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch * config.epochs)
    model, optimizer = accelerator.prepare(module, optimizer)
    checkpoints = None
    if config.resume or config.checkpoint_every_steps is not None:
        checkpoints = Checkpoints.for_run(
            context, prefix, fingerprint(config, train_idx, val_idx, prefix, world)
        )
    logger = context.logger if context is not None and accelerator.is_main_process else None
    state = LoopState()
    payload = checkpoints.load() if checkpoints is not None and config.resume else None
    if payload is not None:
        state = restore(payload, module, optimizer, scheduler, task, rng, accelerator)
        for epoch, metrics in enumerate(state.history, start=1):
            if logger is not None:  # the resumed run's record holds every epoch
                logger.log_metrics(metrics, step=epoch)

    def save() -> None:
        if checkpoints is not None:
            checkpoints.save(state, module, optimizer, scheduler, task, rng, accelerator)

    with (
        quiet_unless(accelerator.is_main_process),
        gradient_checkpointing(module, config.gradient_checkpointing),
        progress(total=config.epochs, desc=prefix, unit="epoch") as epochs_bar,
    ):
        epochs_bar.update(len(state.history))
        while not state.finished and state.epoch <= config.epochs:
            epoch = state.epoch
            if state.batches_done == 0:
                state.epoch_rng, state.total, state.count = rng.bit_generator.state, 0.0, 0
                state.epoch_started = time.time()  # wall clock: survives a resume
            else:  # resumed inside the epoch: draw its batches again
                rng.bit_generator.state = state.epoch_rng
            steps = bucketed_batches(train_idx, task.lengths, cells_per_step, rng)
            pieces = [step_pieces(step, config.batch_size, world, rank) for step in steps]
            n_batches = sum(len(p) for p in pieces)
            model.train()
            with progress(
                total=sum(map(counted_cells, pieces)),
                desc=f"{prefix} epoch {epoch}/{config.epochs}",
                unit="cell",
            ) as bar:
                number = sum(len(p) for p in pieces[: state.batches_done])
                bar.update(sum(map(counted_cells, pieces[: state.batches_done])))
                for index in range(state.batches_done, len(steps)):
                    optimizer.zero_grad(set_to_none=True)
                    step_total, step_count, bad_batch = 0.0, 0, 0
                    for piece_index, (piece, weight) in enumerate(pieces[index]):
                        number += 1
                        last = piece_index == len(pieces[index]) - 1
                        counted = weight > 0
                        with accelerator.no_sync(model) if not last else contextlib.nullcontext():
                            with accelerator.autocast():
                                result = task.batch(model, piece, training=True)
                            loss = float(result.loss.detach())
                            if not math.isfinite(loss):
                                if world == 1:
                                    raise diverged(
                                        f"the training loss is {loss}",
                                        epoch,
                                        f"batch {number} of {n_batches}",
                                        config,
                                    )
                                bad_batch = bad_batch or number  # raised below, on every process
                            accelerator.backward(result.loss * weight)
                        if counted:
                            step_total += loss * result.n_items
                            step_count += result.n_items
                            bar.update(
                                result.n_items,
                                loss=(state.total + step_total) / max(state.count + step_count, 1),
                            )
                    if world > 1:
                        step_total, step_count = exchange_step(
                            accelerator, step_total, step_count, bad_batch, epoch, config
                        )
                    state.total += step_total
                    state.count += step_count
                    if config.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
                    optimizer.step()
                    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no update
                        scheduler.step()
                    state.step += 1
                    state.batches_done = index + 1
                    every = config.checkpoint_every_steps
                    if every is not None and state.step % every == 0 and index + 1 < len(steps):
                        save()
                    if on_step is not None:
                        on_step(epoch, state.step)
            if not all(bool(torch.isfinite(p).all()) for p in parameters):
                raise diverged("the model's weights are no longer finite", epoch, "its last batch", config)
            metrics = {
                f"{prefix}/loss": state.total / max(state.count, 1),
                f"{prefix}/learning_rate": float(scheduler.get_last_lr()[0]),
            }
            if len(val_idx):
                # the model itself, not the DDP wrapper: validation exchanges no gradients
                for name, value in evaluate(
                    module, task, val_idx, config.batch_size, accelerator.autocast, accelerator
                ).items():
                    metrics[f"{prefix}/val_{name}"] = value
                if not math.isfinite(metrics[f"{prefix}/val_loss"]):
                    loss = metrics[f"{prefix}/val_loss"]
                    raise diverged(f"the validation loss is {loss}", epoch, "validation", config)
            metrics[f"{prefix}/epoch_seconds"] = time.time() - state.epoch_started
            state.history.append(metrics)
            if logger is not None:
                logger.log_metrics(metrics, step=epoch)
            shown = {"loss": metrics[f"{prefix}/loss"]}
            if f"{prefix}/val_loss" in metrics:
                shown["val_loss"] = metrics[f"{prefix}/val_loss"]
            epochs_bar.update(1, **shown)
            monitored = metrics.get(f"{prefix}/val_loss", metrics[f"{prefix}/loss"])
            if config.early_stopping_patience is not None:
                if monitored < state.best_loss - 1e-12:
                    state.best_loss, state.stale = monitored, 0
                    state.best_state = copy.deepcopy(
                        {k: v.detach().cpu() for k, v in module.state_dict().items()}
                    )
                else:
                    state.stale += 1
                    state.finished = state.stale >= config.early_stopping_patience
            state.epoch, state.batches_done = epoch + 1, 0
            save()
    if state.best_state is not None:
        module.load_state_dict(state.best_state)
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # drop the autocast wrapper
    module.eval()
    return state.history


def exchange_step(
    accelerator: Accelerator,
    step_total: float,
    step_count: int,
    bad_batch: int,
    epoch: int,
    config: TrainSettings,
) -> tuple[float, int]:
    """Sum one step's training loss and cell count over the processes, and stop every process
    together when one of them met a non-finite loss (a process that stopped alone would leave
    the others waiting in the next gradient exchange)."""
    local = torch.tensor([step_total, step_count, bad_batch], dtype=torch.float64, device=accelerator.device)
    every = accelerator.gather(local).reshape(accelerator.num_processes, 3).cpu()
    bad = torch.nonzero(every[:, 2]).flatten()
    if len(bad):
        process = int(bad[0])
        raise diverged(
            "the training loss is not finite",
            epoch,
            f"batch {int(every[process, 2])} of process {process}",
            config,
        )
    return float(every[:, 0].sum()), int(every[:, 1].sum())


@contextlib.contextmanager
def quiet_unless(main_process: bool) -> Iterator[None]:
    """Progress bars from the main process only (the others train the same steps in step)."""
    if main_process:
        yield
        return
    previous = set_progress(False)
    try:
        yield
    finally:
        set_progress(previous)
