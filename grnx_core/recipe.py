"""Recipes: the YAML schema, loading (safe YAML, ``extends``, overrides) and validation.

Validation collects every problem before raising once. Each problem names the file (and line), the
YAML path (which is also the override path), what was expected, what was found, and a hint.
"""

from __future__ import annotations

import codecs
import copy
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from grnx_core.components import Component, ComponentParams, DataSource, Kind
from grnx_core.errors import GrnxError, PluginError, Problem, RecipeError

SCHEMA_VERSION = 1

# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComponentSpec(_Strict):
    """A registered component by name, with its parameters (validated by the component's Params)."""

    name: str = Field(description="registered component name (see `grnx plugins`)")
    params: dict[str, Any] = Field(default_factory=dict, description="the component's parameters")

    @field_validator("params", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


class DataSpec(ComponentSpec):
    label_key: str | None = Field(None, description="obs column with the class label (e.g. disease)")
    donor_key: str | None = Field(None, description="obs column with the donor / subject")
    batch_key: str | None = Field(None, description="obs column with the batch")
    cell_type_key: str | None = Field(None, description="obs column with the cell type")


#: The cell sets a stage after the sampler can consume (``cells:``).
CellSet = Literal["all", "train", "test", "sample"]


class SamplerSpec(ComponentSpec):
    repeats: int = Field(
        1,
        ge=1,
        le=1000,
        description="draw this many samples, with sampler seeds seed..seed+k-1, each a nested run; "
        "stages that do not consume the sample (the model) run once",
    )
    seed: int | None = Field(None, ge=0, description="seed of the sampler's draw; the recipe seed when None")
    reference: bool = Field(
        False, description="also run the extractors and evaluators on all cells (the full-data reference run)"
    )


class ModelSpec(ComponentSpec):
    cells: CellSet = Field(
        "train", description="cells the model trains on: the split's train cells by default"
    )


class NamedSpec(ComponentSpec):
    id: str | None = Field(None, description="name of this step's outputs and metrics; defaults to name")
    cells: CellSet | None = Field(
        None,
        description="cells this step reads: the sample when there is a sampler, else all (or the component's default)",
    )

    @property
    def step_id(self) -> str:
        return self.id or self.name


class ExtractorSpec(NamedSpec):
    where: dict[str, list[str | int | float | bool]] | None = Field(
        None,
        description="keep only the cells (of the step's cell set) whose obs columns take these values, "
        "e.g. {Subclass: [L5 ET]}: one cell type's interactions from a model trained on all of them",
    )

    @field_validator("where")
    @classmethod
    def _values_listed(
        cls, where: dict[str, list[str | int | float | bool]] | None
    ) -> dict[str, list[str | int | float | bool]] | None:
        if where is not None:
            empty = [column for column, values in where.items() if not values]
            if not where or empty:
                raise ValueError(
                    "where needs at least one obs column, each with at least one value"
                    + (f" (empty: {', '.join(empty)})" if empty else "")
                    + "; remove where to read every cell of the step's cell set"
                )
        return where


class SweepPlot(_Strict):
    metric: str = Field(description="metric to plot, e.g. eval/nes/attention/nes (the mean over repeats)")
    x: str = Field(description="swept recipe path on the x axis; one line per value of the other swept paths")


class SweepSpec(_Strict):
    """A grid over recipe paths; every point is a child recipe run as a nested run."""

    grid: dict[str, list[Any]] = Field(
        description="recipe path -> values, e.g. sampler.params.fraction: [0.01, 0.05]"
    )
    plot: SweepPlot | None = Field(None, description="a figure of one metric against one swept path")

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not grid:
            raise ValueError("the grid needs at least one recipe path")
        for path, values in grid.items():
            if not values:
                raise ValueError(f"{path}: give at least one value")
            if path in ("sweep", "schema_version") or path.startswith("sweep."):
                raise ValueError(f"{path} cannot be swept")
        return grid


class SearchDimension(_Strict):
    """One axis of a tune's search space (Ray Tune's sampling functions, searched by hyperopt)."""

    type: Literal["loguniform", "uniform", "quniform", "choice", "randint"] = Field(
        description="loguniform/uniform: a float in [low, high]; quniform: uniform rounded to a multiple "
        "of q; randint: an integer in low..high, both included; choice: one of values"
    )
    low: float | None = Field(None, description="lower bound (loguniform: > 0)")
    high: float | None = Field(None, description="upper bound")
    q: float | None = Field(None, gt=0, description="quniform: the step values are rounded to")
    values: list[Any] | None = Field(None, description="choice: the values to choose from")

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="after")
    def _bounds(self) -> SearchDimension:
        if self.type == "choice":
            if not self.values:
                raise ValueError("type choice needs a non-empty 'values' list")
            if self.low is not None or self.high is not None or self.q is not None:
                raise ValueError("type choice takes 'values' only, not low/high/q")
            return self
        if self.values is not None:
            raise ValueError(f"type {self.type} takes low and high, not 'values'")
        if self.low is None or self.high is None:
            raise ValueError(f"type {self.type} needs both 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError(f"'low' must be below 'high', got low {self.low:g} and high {self.high:g}")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (it samples log(value)), got {self.low:g}")
        if self.type == "quniform" and self.q is None:
            raise ValueError("quniform needs 'q', the step its values are rounded to")
        if self.type != "quniform" and self.q is not None:
            raise ValueError(f"'q' applies to quniform only, not {self.type}")
        if self.type == "randint" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError(f"randint needs integer bounds, got {self.low:g} and {self.high:g}")
        return self

    def extremes(self) -> list[Any]:
        """The values at the edges of this axis (every value of a choice): what validation tries."""
        if self.type == "choice":
            return list(self.values or [])
        assert self.low is not None and self.high is not None
        if self.type == "randint":
            return [int(self.low), int(self.high)]
        if self.type == "quniform":
            assert self.q is not None
            values = [round(self.low / self.q) * self.q, round(self.high / self.q) * self.q]
            if all(float(v).is_integer() for v in (self.q, self.low, self.high)):
                return [int(v) for v in values]
            return values
        return [self.low, self.high]


class TuneScheduler(_Strict):
    """Early stopping of trials: ASHA (asynchronous successive halving) on a per-epoch metric."""

    type: Literal["none", "asha"] = Field("none", description="none: every trial runs to the end")
    metric: str = Field(
        "train/val_loss", description="per-epoch metric ASHA compares trials on (the training loop logs it)"
    )
    mode: Literal["min", "max"] = Field(
        "min", description="whether lower or higher values of metric are better"
    )
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="keep the best 1/reduction_factor at each rung")
    max_t: int | None = Field(
        None, ge=1, description="epochs of a trial that runs to the end; train.epochs when None"
    )


class TrialResources(_Strict):
    cpu: float = Field(1.0, gt=0, description="CPUs reserved for each trial")
    gpu: float = Field(0.0, ge=0, description="GPUs (or a fraction of one) reserved for each trial")


class GroundTruthSplit(_Strict):
    """Tune on one part of the ground-truth edges and report the best trial on the other."""

    fraction: float = Field(
        0.5, gt=0, lt=1, description="share of the ground-truth pairs trials are scored on"
    )
    seed: int = Field(0, ge=0, description="seed of the split of the pairs")


class TuneSpec(_Strict):
    """A Ray Tune search over recipe paths; every trial is a child recipe run as a nested run."""

    space: dict[str, SearchDimension] = Field(
        description="recipe path -> distribution, e.g. train.learning_rate: {type: loguniform, low: 0.000001, "
        "high: 0.001}"
    )
    metric: str = Field(description="logged metric to optimise, e.g. eval/classification/macro_f1")
    mode: Literal["max", "min"] = Field(description="max: higher metric is better; min: lower is better")
    num_samples: int = Field(10, ge=1, le=10_000, description="number of trials")
    n_initial_points: int | None = Field(
        None,
        ge=1,
        description="random trials before hyperopt's TPE takes over (Ray's default of 20 turns a tune of 20 "
        "trials or fewer into a random search); about a quarter of num_samples, at least 1, when None",
    )
    max_concurrent: int = Field(1, ge=1, description="trials running at the same time")
    resources_per_trial: TrialResources = Field(default_factory=TrialResources)
    scheduler: TuneScheduler = Field(default_factory=TuneScheduler)
    ground_truth_split: GroundTruthSplit | None = Field(
        None, description="score trials on part of the ground-truth edges, report the best on the rest"
    )
    seed: int | None = Field(None, ge=0, description="seed of the search; the recipe seed when None")

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_by_name(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    @field_validator("space")
    @classmethod
    def _paths(cls, space: dict[str, SearchDimension]) -> dict[str, SearchDimension]:
        if not space:
            raise ValueError("the space needs at least one recipe path")
        for path in space:
            if path.split(".")[0] in ("tune", "sweep", "schema_version"):
                raise ValueError(f"{path} cannot be tuned")
        return space

    @model_validator(mode="after")
    def _start_points(self) -> TuneSpec:
        if (
            self.n_initial_points is not None
            and self.num_samples > 1
            and self.n_initial_points >= self.num_samples
        ):
            raise ValueError(
                f"n_initial_points ({self.n_initial_points}) must be below num_samples ({self.num_samples}): "
                "with as many random start points as trials hyperopt never searches. Lower it, e.g. to "
                f"{max(1, self.num_samples // 4)}"
            )
        return self

    @property
    def initial_points(self) -> int:
        """The random start points hyperopt gets (``n_initial_points``, else a quarter of the trials)."""
        if self.n_initial_points is not None:
            return self.n_initial_points
        return max(1, self.num_samples // 4)


class TrainSettings(_Strict):
    """How models are trained; read by every model's ``fit``. Non-finite numbers are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: int = Field(3, ge=1, description="passes over the training cells")
    batch_size: int = Field(
        32, ge=1, description="cells per batch (per process under torchrun / accelerate launch)"
    )
    learning_rate: float = Field(0.0001, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay")
    optimizer: Literal["adam", "adamw"] = Field("adamw", description="optimiser")
    scheduler: Literal["constant", "linear", "cosine", "polynomial"] = Field(
        "constant", description="learning-rate schedule after warm-up"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    validation_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of training cells held out for validation"
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="stop after this many epochs without validation improvement; None trains all epochs",
    )
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="loss weights against class imbalance"
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping norm; None disables")
    freeze_layers: int = Field(0, ge=0, description="encoder layers kept frozen when fine-tuning")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto uses a GPU when one is present")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast precision: bf16 on CPU or GPU, fp16 on CUDA only (loss-scaled)"
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="batches summed per optimiser step; effective batch = batch_size x this"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute transformer blocks in the backward pass: less memory, ~30% slower"
    )
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="save a resumable checkpoint every N optimiser steps (and after each epoch)"
    )
    resume: bool = Field(
        False, description="continue from the run's last checkpoint; saves one after each epoch"
    )


class ExecutionSettings(_Strict):
    """Where and how the work runs. Never part of a cache key: it changes speed, not results."""

    ray_address: str | None = Field(
        None,
        description="address of an existing Ray cluster (e.g. ray://head:10001 or 127.0.0.1:6379) for "
        "parallel work; None starts a local Ray when a step needs one",
    )
    num_workers: int | None = Field(
        None, ge=1, description="parallel workers for steps that split their work; all local CPUs when None"
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads; the GRNX_NUM_THREADS variable when None, else torch's default",
    )


class TrackingSpec(_Strict):
    experiment: str = Field("grnx", min_length=1, description="MLflow experiment name")
    run_name: str | None = Field(None, description="MLflow run name; defaults to the recipe name")
    tags: dict[str, str] = Field(default_factory=dict, description="extra tags on the run")


class Recipe(_Strict):
    """A whole experiment. Every stage after ``data`` is optional."""

    schema_version: Literal[1] = Field(description="recipe format version; 1")
    name: str = Field(min_length=1, description="short name of the experiment")
    description: str = Field("", description="what the recipe is for")
    version: int = Field(1, ge=1, description="bump when a change alters the results")
    seed: int = Field(0, ge=0, description="seed of every random choice in the run")
    data: DataSpec
    preprocess: list[ComponentSpec] = Field(default_factory=list)
    sampler: SamplerSpec | None = None
    tokenizer: ComponentSpec | None = None
    model: ModelSpec | None = None
    train: TrainSettings = Field(default_factory=TrainSettings)
    execution: ExecutionSettings = Field(default_factory=ExecutionSettings)
    extractors: list[ExtractorSpec] = Field(default_factory=list)
    evaluators: list[NamedSpec] = Field(default_factory=list)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    cache: bool = Field(True, description="reuse finished steps from the cache")
    sweep: SweepSpec | None = Field(None, description="a grid of child recipes, each a nested run")
    tune: TuneSpec | None = Field(
        None, description="a Ray Tune + hyperopt search over recipe paths, each trial a nested run"
    )

    @field_validator("preprocess", "extractors", "evaluators", mode="before")
    @classmethod
    def _none_is_empty_list(cls, value: Any) -> Any:
        return [] if value is None else value


#: Recipe field -> component kind, for the sections that name components.
SECTION_KINDS: dict[str, Kind] = {
    "data": Kind.DATA,
    "preprocess": Kind.PREPROCESSOR,
    "sampler": Kind.SAMPLER,
    "tokenizer": Kind.TOKENIZER,
    "model": Kind.MODEL,
    "extractors": Kind.EXTRACTOR,
    "evaluators": Kind.EVALUATOR,
}


# ---------------------------------------------------------------------------------------------
# Loading: YAML, extends, overrides, with the origin of every value
# ---------------------------------------------------------------------------------------------


@dataclass
class Origins:
    """Where each YAML path got its value: ``file:line`` or ``override 'a.b=c'``."""

    by_path: dict[str, str] = field(default_factory=dict)
    override_paths: dict[str, str] = field(default_factory=dict)

    def of(self, path: str) -> str:
        """The origin of the longest recorded prefix of ``path``."""
        parts = path.split(".") if path else []
        for end in range(len(parts), -1, -1):
            prefix = ".".join(parts[:end])
            if prefix in self.override_paths:
                return f"override '{self.override_paths[prefix]}'"
            if prefix in self.by_path:
                return self.by_path[prefix]
        return ""


@dataclass
class LoadedRecipe:
    """The merged recipe data before validation, with where each value came from."""

    path: Path
    data: dict[str, Any]
    given_text: str
    overrides: list[str]
    origins: Origins


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


#: Bounds on what a recipe may hold. A recipe is a few hundred lines; anything far larger is a
#: mistake (a data file given as the recipe) or hostile: a YAML alias bomb of a few hundred bytes
#: expands to billions of values and would exhaust the memory of whatever reads it.
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 100_000
MAX_RECIPE_DEPTH = 50
#: The largest int a component parameter may take (about 10**12): sizes above it cannot be held
#: by any machine, so they are refused at validation rather than failing a run with MemoryError.
MAX_INT_PARAM = 2**40

# A byte-order mark fixes the encoding; UTF-32 LE is tested before UTF-16 LE, whose mark it starts with.
_BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8-sig", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"),
)


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that is not a recipe grnx will read (too deep, too large, a list as a key)."""

    def __init__(self, problem: str, mark: Any, hint: str) -> None:
        super().__init__(problem=problem, problem_mark=mark)
        self.hint = hint


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate and unhashable keys, deep nesting and alias bombs.

    Nodes are counted as they are composed, an alias counting every node of what it repeats, so
    a recipe is refused before anything expands it. Numbers in exponent form (``1e-5``, ``1e14``,
    ``2.5E-4``) are floats, as in YAML 1.2; PyYAML reads them as strings.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._open_anchors: set[str] = set()
        self._sizes: dict[int, int] = {}  # id(node) -> how many nodes it expands to

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if event.anchor in self._open_anchors:
                raise _Refused(
                    f"the alias *{event.anchor} is inside the value &{event.anchor} it repeats, so it "
                    "never ends",
                    event.start_mark,
                    hint=f"Remove *{event.anchor} there.",
                )
            return super().compose_node(parent, index)
        event = self.peek_event()
        if self._depth >= MAX_RECIPE_DEPTH:
            raise _Refused(
                f"values are nested more than {MAX_RECIPE_DEPTH} levels deep; a recipe needs a few",
                event.start_mark,
                hint="Flatten the nesting there.",
            )
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._open_anchors.add(anchor)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor is not None:
                self._open_anchors.discard(anchor)
        if node is None:
            return node
        if isinstance(node, yaml.SequenceNode):
            children: list[yaml.Node] = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [item for pair in node.value for item in pair]
        else:
            children = []
        size = 1 + sum(self._sizes.get(id(child), 1) for child in children)
        self._sizes[id(node)] = size
        if size > MAX_RECIPE_NODES:
            raise _Refused(
                f"this value expands to more than {MAX_RECIPE_NODES:,} values (each YAML alias *name "
                "repeats everything its anchor &name holds); a recipe holds a few hundred",
                node.start_mark,
                hint="Remove the aliases that repeat large values.",
            )
        return node


def _construct_mapping(loader: _RecipeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise _Refused(
                f"a mapping key is a {type(key).__name__}; recipe keys are plain names such as seed",
                key_node.start_mark,
                hint="Write the key as a name, or quote it.",
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping",
                node.start_mark,
                f"found duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _compose_and_load(text: str) -> tuple[Any, yaml.Node | None]:
    """The data of one YAML document and its node graph, within the bounds above."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return data, node


def load_yaml_value(text: str) -> Any:
    """Read one YAML value (an override's) with the recipe loader's safety and bounds."""
    return _compose_and_load(text)[0]


def _line_map(node: yaml.Node | None, display: str, prefix: str = "") -> dict[str, str]:
    """YAML path -> "file:line" for every node of a composed document."""
    lines: dict[str, str] = {}
    if node is None:
        return lines
    lines[prefix] = f"{display}:{node.start_mark.line + 1}"
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            lines.update(_line_map(value_node, display, f"{prefix}.{key}" if prefix else key))
            lines[f"{prefix}.{key}" if prefix else key] = f"{display}:{key_node.start_mark.line + 1}"
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.update(_line_map(item, display, f"{prefix}.{index}" if prefix else str(index)))
    return lines


def _read_text(path: Path) -> str:
    """The recipe file as text: UTF-8, or UTF-16/32 with a byte-order mark; at most 1 MiB."""
    display = _display(path)
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_RECIPE_BYTES + 1)
    except OSError as error:
        raise RecipeError(
            [Problem("", f"cannot read the recipe: {error.strerror or error}", source=display)]
        ) from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(
            [
                Problem(
                    "",
                    f"the file is larger than {MAX_RECIPE_BYTES // 2**20} MiB; a recipe is a few KiB of YAML",
                    source=display,
                    hint="Check that this is the recipe and not a data file.",
                )
            ]
        )
    encoding, label = "utf-8", "UTF-8"
    for mark, codec, name in _BYTE_ORDER_MARKS:
        if raw.startswith(mark):
            encoding, label = codec, name
            break
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        start = error.start  # a byte offset from the start of the file, byte-order mark included
        before = raw[:start].decode(encoding, errors="replace")
        line = before.count("\n") + 1
        column = len(before) - (before.rfind("\n") + 1) + 1
        found = " ".join(f"0x{byte:02x}" for byte in raw[start : min(error.end, start + 4)])
        if label == "UTF-8":
            looks = " (it looks Latin-1 or Windows-1252 encoded)"
            hint = f"Save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed.yaml`)."
        else:
            looks = f" (the file starts with a {label} byte-order mark but is cut off or damaged there)"
            hint = "Save the file again, as UTF-8."
        raise RecipeError(
            [
                Problem(
                    "",
                    f"not valid {label}: byte {found} at byte offset {start} cannot be decoded{looks}",
                    source=f"{display}:{line}:{column}",
                    hint=hint,
                )
            ]
        ) from None
    if "\x00" in text:
        offset = text.index("\x00")
        raise RecipeError(
            [
                Problem(
                    "",
                    f"the file holds NUL bytes (the first at character {offset}): it looks UTF-16 or UTF-32 "
                    "without a byte-order mark, or binary",
                    source=display,
                    hint="Save the file as UTF-8.",
                )
            ]
        )
    return text


def _read_yaml(path: Path) -> tuple[dict[str, Any], str, dict[str, str]]:
    display = _display(path)
    if not path.exists():
        raise RecipeError([Problem("", f"recipe file not found: {display}", hint="Check the path.")])
    if path.is_dir():
        raise RecipeError([Problem("", f"{display} is a folder; give a recipe .yaml file.")])
    text = _read_text(path)
    try:
        data, node = _compose_and_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{display}:{mark.line + 1}:{mark.column + 1}" if mark else display
        problem = getattr(error, "problem", None) or str(error)
        if isinstance(error, _Refused):
            raise RecipeError([Problem("", problem, source=where, hint=error.hint)]) from None
        raise RecipeError(
            [Problem("", f"not valid YAML: {problem}", source=where, hint="Fix the YAML syntax there.")]
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(
            [
                Problem(
                    "",
                    f"a recipe must be a YAML mapping of keys to values, found {type(data).__name__}",
                    source=display,
                )
            ]
        )
    return data, text, _line_map(node, display)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; lists and scalars from ``update`` replace the base's.

    A section that names another component (``data: {name: h5ad, ...}`` over ``data: {name: csv,
    ...}``) replaces the base's whole: the old component's params mean nothing to the new one.
    """
    merged = copy.deepcopy(base)
    for key, value in update.items():
        current = merged.get(key)
        if (
            isinstance(value, dict)
            and isinstance(current, dict)
            and not ("name" in value and "name" in current and value["name"] != current["name"])
        ):
            merged[key] = _deep_merge(current, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _load_with_extends(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(_display(p) for p in (*chain, resolved))
        raise RecipeError(
            [
                Problem(
                    "extends",
                    f"recipes extend each other in a cycle: {cycle}",
                    source=_display(path),
                    hint="Remove one of the extends.",
                )
            ]
        )
    data, _, lines = _read_yaml(path)
    base_name = data.pop("extends", None)
    if base_name is None:
        return data, lines
    if not isinstance(base_name, str):
        raise RecipeError(
            [
                Problem(
                    "extends",
                    f"must be the path of a base recipe, got {base_name!r}",
                    source=lines.get("extends", _display(path)),
                )
            ]
        )
    base_path = path.parent / base_name
    if not base_path.exists():
        raise RecipeError(
            [
                Problem(
                    "extends",
                    f"base recipe {base_name!r} not found (looked for {_display(base_path)})",
                    source=lines.get("extends", _display(path)),
                    hint="Paths in extends are relative to the recipe that names them.",
                )
            ]
        )
    base_data, base_lines = _load_with_extends(base_path, (*chain, resolved))
    merged_lines = dict(base_lines)
    merged_lines.update(lines)
    return _deep_merge(base_data, data), merged_lines


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.0.c=value"`` -> (["a", "b", "0", "c"], value); the value is read as YAML."""
    if "=" not in text:
        raise ValueError("expected KEY.PATH=VALUE, e.g. seed=1 or sampler.params.fraction=0.1")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not key.strip() or any(not part for part in parts):
        raise ValueError(f"the key {key!r} is not a dotted path such as model.params.n_layers")
    try:
        value = load_yaml_value(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or error.__class__.__name__
        raise ValueError(f"the value {raw!r} is not valid YAML ({problem})") from None
    return parts, value


def apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set ``value`` at the dotted path; list items are addressed by index."""
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        walked = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"{walked}: there is no item {part!r} in a list of {len(node)}")
            index = int(part)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ValueError(
                f"{'.'.join(parts[:depth])} is a value ({node!r}), not a section, so it has no key {part!r}"
            )


def load_recipe_data(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedRecipe:
    """Read a recipe file, follow ``extends`` and apply command-line overrides (not validated)."""
    path = Path(path)
    data, lines = _load_with_extends(path)
    given_text = _read_text(path)
    origins = Origins(by_path=lines)
    problems = []
    for override in overrides:
        try:
            parts, value = parse_override(override)
            apply_override(data, parts, value)
            origins.override_paths[".".join(parts)] = override
        except ValueError as error:
            problems.append(Problem("", f"bad override '{override}': {error}", source="command line"))
    if problems:
        raise RecipeError(problems)
    return LoadedRecipe(
        path=path, data=data, given_text=given_text, overrides=list(overrides), origins=origins
    )


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@dataclass
class ResolvedStep:
    """One component step of a validated recipe: its class and validated parameters."""

    section: str
    path: str
    kind: Kind
    spec: ComponentSpec
    component_class: type[Component]
    params: ComponentParams
    plugin: str = ""
    plugin_version: str = ""

    @property
    def step_id(self) -> str:
        return getattr(self.spec, "step_id", self.spec.name)

    @property
    def needs(self) -> tuple[str, ...] | None:
        """What the component reads (see ``grnx_core.components.NEEDS``); None: everything available."""
        return getattr(self.component_class, "needs", None)

    def build(self) -> Component:
        return self.component_class.from_params(self.params)


@dataclass
class ResolvedRecipe:
    """A valid recipe, with every component looked up and every parameter default filled in."""

    recipe: Recipe
    steps: list[ResolvedStep]
    source: LoadedRecipe | None = None
    #: the registry the components were looked up in (children of a sweep are validated in it)
    registry: Any = None

    def step(self, section: str) -> ResolvedStep | None:
        return next((s for s in self.steps if s.section == section), None)

    def steps_of(self, section: str) -> list[ResolvedStep]:
        return [s for s in self.steps if s.section == section]

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data: what `grnx show` prints and MLflow records."""
        resolved = self.recipe.model_dump(mode="json")
        for step in self.steps:
            target: Any = resolved
            for part in step.path.split("."):
                target = target[int(part)] if isinstance(target, list) else target[part]
            target["params"] = step.params.model_dump(mode="json")
        return resolved

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


def _format_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _pydantic_problems(
    error: ValidationError, prefix: str, origins: Origins, model: type[BaseModel], hint: str = ""
) -> list[Problem]:
    problems = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        path = ".".join([prefix, *loc] if prefix else loc)
        kind = item["type"]
        if kind == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            close = difflib.get_close_matches(loc[-1], allowed, n=1)
            suggestion = f" Did you mean {close[0]!r}?" if close else ""
            message = f"unknown key {loc[-1]!r}.{suggestion} Allowed: {', '.join(allowed)}."
        elif kind == "missing":
            message = "is required but missing"
        elif kind == "literal_error":
            message = f"{item['msg'][0].lower()}{item['msg'][1:]}, got {_format_value(item.get('input'))}"
        else:
            msg = item["msg"]
            message = f"{msg[0].lower()}{msg[1:]}, got {_format_value(item.get('input'))}"
        source = origins.of(path)
        problems.append(Problem(path, message, source=source, hint=hint))
    return problems


def _allowed_keys(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the (nested) model at ``loc``; list indices are skipped."""
    current: Any = model
    for part in loc:
        if part.isdigit():
            continue
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return []
        annotation = fields[part].annotation
        current = _model_in(annotation)
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None


def validate_recipe(loaded: LoadedRecipe, registry: Any) -> ResolvedRecipe:
    """Validate the whole recipe and every component's params; raise once with every problem."""
    problems: list[Problem] = []
    data = loaded.data
    origins = loaded.origins
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        problems.extend(_pydantic_problems(error, "", origins, Recipe))
        recipe = None

    steps: list[ResolvedStep] = []
    for section, kind in SECTION_KINDS.items():
        raw = data.get(section)
        if raw is None:
            continue
        items = list(enumerate(raw)) if isinstance(raw, list) else [(None, raw)]
        for index, item in items:
            path = section if index is None else f"{section}.{index}"
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                continue  # the schema check above already reported it
            name = item["name"]
            try:
                entry = registry.entry(kind, name, where=path + ".name")
                component_class = entry.load()
            except PluginError as error:
                problems.append(Problem(path + ".name", str(error), source=origins.of(path + ".name")))
                continue
            params = item.get("params") or {}
            if not isinstance(params, dict):
                continue
            try:
                validated = component_class.Params(**params)
                validated = _fill_run_defaults(validated, data, section, name, index, origins)
            except ValidationError as error:
                problems.extend(
                    _pydantic_problems(
                        error,
                        path + ".params",
                        origins,
                        component_class.Params,
                        hint=f"(see `grnx plugins {kind.value} {name}`)",
                    )
                )
                continue
            except (TypeError, ValueError) as error:
                problems.append(Problem(path + ".params", str(error), source=origins.of(path + ".params")))
                continue
            too_large = _impossible_sizes(validated.model_dump(), path + ".params", origins)
            if too_large:
                problems.extend(too_large)
                continue
            if recipe is not None:
                spec = getattr(recipe, section)
                spec = spec[index] if index is not None else spec
                steps.append(
                    ResolvedStep(
                        section,
                        path,
                        kind,
                        spec,
                        component_class,
                        validated,
                        entry.plugin,
                        entry.plugin_version,
                    )
                )

    if recipe is not None:
        problems.extend(_impossible_sizes(recipe.train.model_dump(), "train", origins))
        problems.extend(_cross_checks(recipe, steps, origins))
    if problems:
        raise RecipeError(problems)
    assert recipe is not None
    return ResolvedRecipe(recipe=recipe, steps=steps, source=loaded, registry=registry)


def _impossible_sizes(values: dict[str, Any], prefix: str, origins: Origins) -> list[Problem]:
    """Ints above MAX_INT_PARAM, which no component can allocate or loop over (seeds excepted).

    A component's field may have no upper bound; without this a typo such as ``n_cells: 1e14``
    passes validation and the run dies of MemoryError in its first stage.
    """
    problems = []
    for key, value in flatten(values, prefix).items():
        name = key.rsplit(".", 1)[-1]
        if name == "seed" or name.endswith("_seed"):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT_PARAM:
            problems.append(
                Problem(
                    key,
                    f"{value:,} is larger than any run can hold or compute (grnx refuses ints above "
                    f"2**40 = {MAX_INT_PARAM:,})",
                    source=origins.of(key),
                    hint="Lower it to the size you mean.",
                )
            )
    return problems


def derive_seed(recipe_seed: int, stream: str) -> int:
    """A seed for one named stream of a run, fixed by the recipe seed (in [0, 2**31))."""
    import hashlib

    digest = hashlib.sha256(f"{recipe_seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 2**31


def _fill_run_defaults(
    params: ComponentParams,
    data: dict[str, Any],
    section: str,
    name: str,
    index: int | None,
    origins: Origins,
) -> ComponentParams:
    """Fill a None ``seed`` from the recipe seed and None role fields from the recipe's data roles.

    The stream of a step's seed is its section and name (``preprocess/split``; the k-th repeat of a
    name gets ``#k``), so inserting another step does not change it.
    """
    updates: dict[str, Any] = {}
    fields = type(params).model_fields
    if "seed" in fields and params.seed is None:  # type: ignore[attr-defined]
        recipe_seed = data.get("seed", 0)
        recipe_seed = recipe_seed if isinstance(recipe_seed, int) and recipe_seed >= 0 else 0
        stream = f"{section}/{name}"
        items = data.get(section)
        if isinstance(items, list) and index is not None:
            earlier = sum(1 for item in items[:index] if isinstance(item, dict) and item.get("name") == name)
            stream += f"#{earlier}" if earlier else ""
        updates["seed"] = derive_seed(recipe_seed, stream)
    data_section = data.get("data")
    roles = data_section if isinstance(data_section, dict) else {}
    for field_name, info in fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        role = extra.get("grnx_role")
        if role and getattr(params, field_name) is None and isinstance(roles.get(role), str):
            updates[field_name] = roles[role]
    return params.model_copy(update=updates) if updates else params


def _cross_checks(recipe: Recipe, steps: list[ResolvedStep], origins: Origins) -> list[Problem]:
    """Checks across sections: unique step ids, a tokenizer for token models, every need met."""
    problems = []
    for section in ("extractors", "evaluators"):
        seen: dict[str, int] = {}
        for index, spec in enumerate(getattr(recipe, section)):
            if spec.step_id in seen:
                path = f"{section}.{index}"
                problems.append(
                    Problem(
                        path,
                        f"the id {spec.step_id!r} is used twice (also {section}.{seen[spec.step_id]})",
                        source=origins.of(path),
                        hint="Give one of them a different 'id'.",
                    )
                )
            seen[spec.step_id] = index
    model = next((s for s in steps if s.section == "model"), None)
    if (
        model is not None
        and getattr(model.component_class, "input_kind", "tokens") == "tokens"
        and recipe.tokenizer is None
    ):
        problems.append(
            Problem(
                "tokenizer",
                f"model {model.spec.name!r} reads tokenised cells, but the recipe has no tokenizer",
                source=origins.of("model"),
                hint="Add a 'tokenizer' section (see `grnx plugins tokenizer`).",
            )
        )
    problems.extend(_unmet_needs(recipe, steps, origins))
    problems.extend(_missing_files(steps, origins))
    if not any(problem.path.startswith("data") for problem in problems):
        problems.extend(_unknown_role_columns(recipe, steps, origins))
    return problems


#: the data roles that name obs columns of the source
_ROLE_FIELDS = ("label_key", "donor_key", "batch_key", "cell_type_key")


def _written_obs_columns(step: ResolvedStep) -> set[str] | None:
    """obs columns a preprocessor declares it writes (``obs/<param>`` resolved from its params);
    None when a declaration cannot be resolved, so any column might appear."""
    columns: set[str] = set()
    for entry in getattr(step.component_class, "writes", ()):
        if not entry.startswith("obs/"):
            continue
        name = entry[len("obs/") :]
        if not (name.startswith("<") and name.endswith(">")):
            columns.add(name)
            continue
        value = getattr(step.params, name[1:-1], None)
        if isinstance(value, str):
            columns.add(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            columns.update(value)
        elif isinstance(value, dict) and all(isinstance(v, str) for v in value):
            columns.update(value)
        else:
            return None
    return columns


def _unknown_role_columns(recipe: Recipe, steps: list[ResolvedStep], origins: Origins) -> list[Problem]:
    """A data role (label_key, donor_key, ...) naming a column neither the source nor a
    preprocessor provides, when the source can list its columns cheaply."""
    source = next((step for step in steps if step.section == "data"), None)
    if source is None:
        return []
    component = source.build()
    if not isinstance(component, DataSource):
        return []
    try:
        columns = component.obs_columns()
    except GrnxError as error:
        return [Problem("data.params", str(error), source=origins.of("data.params"))]
    if columns is None:
        return []
    available = set(columns)
    for step in steps:
        if step.section == "preprocess":
            written = _written_obs_columns(step)
            if written is None:
                return []
            available |= written
    named = [
        (f"data.{role}", column, "join a metadata table (params.metadata), or remove the role")
        for role in _ROLE_FIELDS
        if (column := getattr(recipe.data, role)) is not None
    ]
    named += [
        (f"{step.path}.where", column, "or fix the step's where")
        for step in steps
        for column in getattr(step.spec, "where", None) or {}
    ]
    problems = []
    for path, column, remedy in named:
        if column in available:
            continue
        close = difflib.get_close_matches(column, sorted(available), n=1)
        problems.append(
            Problem(
                path,
                f"obs column {column!r} is not in the data of source {recipe.data.name!r} (its columns: "
                f"{', '.join(sorted(columns)[:15]) or 'none'}) and no preprocessor writes it",
                source=origins.of(path),
                hint=(f"Did you mean {close[0]!r}? " if close else "")
                + f"Name one of the data's columns, {remedy}.",
            )
        )
    return problems


def _missing_files(steps: list[ResolvedStep], origins: Origins) -> list[Problem]:
    """Every file a component names, checked before any stage runs.

    Without this, a misspelt ground-truth path is first read after preprocessing and training.
    """
    problems = []
    for step in steps:
        try:
            files = step.build().input_files()
        except GrnxError as error:
            problems.append(Problem(step.path + ".params", str(error), source=origins.of(step.path)))
            continue
        named = flatten(step.params.model_dump(), step.path + ".params")
        for file in files:
            if file.exists():
                continue
            path = next(
                (
                    key
                    for key, value in named.items()
                    if isinstance(value, str) and Path(value).expanduser() == file
                ),
                step.path + ".params",
            )
            problems.append(
                Problem(
                    path,
                    f"file {str(file)!r} not found (resolved to {file.resolve()})",
                    source=origins.of(path),
                    hint="Relative paths resolve from the current directory (run grnx from the "
                    "repository root for the recipes in recipes/); fix the path or fetch the file.",
                )
            )
    return problems


def _unmet_needs(recipe: Recipe, steps: list[ResolvedStep], origins: Origins) -> list[Problem]:
    """A need no stage of the recipe provides, reported before any compute."""
    provided = {"data", "cells", "ground_truth"}
    if recipe.model is not None:
        provided.add("model_inputs")
    if recipe.tokenizer is not None:
        provided |= {"tokens", "tokenizer"}
    if recipe.model is not None:
        provided.add("model")
    if recipe.extractors:
        provided.add("interactions")
    adds = {
        "tokens": "a 'tokenizer' section",
        "tokenizer": "a 'tokenizer' section",
        "model": "a 'model' section",
        "interactions": "an extractor ('extractors' list)",
    }
    problems = []
    for step in steps:
        if step.section not in ("extractors", "evaluators"):
            continue
        for need in step.needs or ():
            if need not in provided:
                problems.append(
                    Problem(
                        step.path,
                        f"{step.kind.value} {step.spec.name!r} needs {need}, which no stage of the recipe provides",
                        source=origins.of(step.path),
                        hint=f"Add {adds.get(need, need)}.",
                    )
                )
        reads_cells = {"cells", "data", "tokens", "model_inputs"}
        if getattr(step.spec, "where", None) and step.needs is not None and not set(step.needs) & reads_cells:
            problems.append(
                Problem(
                    f"{step.path}.where",
                    f"narrows the cells a step reads, but {step.kind.value} {step.spec.name!r} reads no "
                    f"cells (it needs {', '.join(step.needs) or 'nothing'}), so where would change nothing",
                    source=origins.of(f"{step.path}.where"),
                    hint="Remove where from this step.",
                )
            )
        cells = getattr(step.spec, "cells", None)
        if cells == "sample" and recipe.sampler is None:
            problems.append(
                Problem(
                    f"{step.path}.cells",
                    "is 'sample', but the recipe has no sampler",
                    source=origins.of(f"{step.path}.cells"),
                    hint="Add a 'sampler' section or use cells: all.",
                )
            )
    if recipe.model is not None and recipe.model.cells == "sample" and recipe.sampler is None:
        problems.append(
            Problem(
                "model.cells",
                "is 'sample', but the recipe has no sampler",
                source=origins.of("model.cells"),
                hint="Add a 'sampler' section or use cells: train.",
            )
        )
    return problems


def load_recipe(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), registry: Any = None
) -> ResolvedRecipe:
    """Load, merge, override and validate a recipe file."""
    from grnx_core.expansion import expand
    from grnx_core.registry import default_registry

    loaded = load_recipe_data(path, overrides)
    resolved = validate_recipe(loaded, registry or default_registry())
    expand(resolved, resolved.registry)  # every child (sweep point, repeat, reference) must be valid too
    if resolved.recipe.tune is not None:
        from grnx_core.tuning import validate_tune

        validate_tune(resolved)  # the space's bounds, the metric, the ground-truth split
    return resolved


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings and lists -> {"a.b.0.c": value}; each key is a valid override path."""
    flat: dict[str, Any] = {}
    if isinstance(data, dict):
        if not data and prefix:
            flat[prefix] = {}
        for key, value in data.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, list):
        if not data and prefix:
            flat[prefix] = []
        for index, value in enumerate(data):
            flat.update(flatten(value, f"{prefix}.{index}" if prefix else str(index)))
    else:
        flat[prefix] = data
    return flat
