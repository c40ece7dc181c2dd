"""The executor: one leaf recipe's stages as a graph over cell sets, cached and tracked in one place.

Stages and what each reads (a leaf recipe has no repeats, reference or sweep; the runner expands
those into leaves):

    data ─► preprocess:0 ─► ... ─► preprocess:k  (the prepared AnnData, all cells)
                                        ├─► sample                      (CellSample + its obs columns)
                                        ├─► tokenize (all cells once; fitted on the train cells)
                                        ├─► model    (cells: train by default)
                                        ├─► extract:<id>  (cells: the sample, else all)
                                        └─► evaluate:<id> (not cached; one that reads neither the sample
                                                           nor interactions is shared in the run's memo)

Every stage's cache key is computed from the keys of what it reads and the identity of its component
(``grnx_core.identity``) before anything is loaded, so a fully cached run reads no expression
matrix: values are loaded only when a stage that must compute needs them. Stage outputs are
immutable values shared by the leaves of one ``grnx run`` through an in-memory memo (the model of
five repeats is trained once and loaded once). A stage served from the memo or the cache replays
what it logged (``grnx_core.stage_log``), so tracking looks the same either way.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from grnx_core.cache import Cache, step_key
from grnx_core.components import (
    Component,
    DataSource,
    Evaluator,
    Extractor,
    Model,
    Preprocessor,
    Sampler,
    Tokenizer,
)
from grnx_core.context import DataRoles, NullLogger, RunContext, RunLogger
from grnx_core.data_types import CellSample, EvaluationResult, GroundTruth, Interactions, TokenizedCells
from grnx_core.errors import DataError, GrnxError
from grnx_core.identity import component_identity, input_file_digest
from grnx_core.recipe import ResolvedRecipe, ResolvedStep
from grnx_core.stage_log import RECORD_FILE, RecordingLogger, artifact_path, replay, replay_events

log = logging.getLogger("grnx")

#: Run tag holding the folder of the run's tokens in the cache.
TOKENS_PATH_TAG = "grnx.tokens_path"

ROLE_NAMES = ("label_key", "donor_key", "batch_key", "cell_type_key")

_C = TypeVar("_C", bound=Component)


def _build(step: ResolvedStep, base: type[_C]) -> _C:
    """The step's component, typed as its kind's base class (the registry checked the subclass)."""
    component = step.build()
    assert isinstance(component, base)
    return component


def _component_class(step: ResolvedStep, base: type[_C]) -> type[_C]:
    """The step's class, typed as its kind's base class (the registry checked the subclass)."""
    cls = step.component_class
    assert issubclass(cls, base)
    return cls


class _SkipCache(Exception):
    """Raised by a stage's compute to keep its value without storing it (e.g. an unwritable uns)."""

    def __init__(self, value: Any) -> None:
        super().__init__("not cached")
        self.value = value


class Lazy:
    """A stage value that is loaded from the cache only when a computing stage asks for it."""

    def __init__(
        self, load: Callable[[], Any] | None = None, value: Any = None, loaded: bool = False
    ) -> None:
        self._load, self._value, self._loaded = load, value, loaded or load is None

    def get(self) -> Any:
        if not self._loaded:
            assert self._load is not None
            self._value, self._loaded = self._load(), True
        return self._value


class PreparedData(Lazy):
    """The AnnData after preprocessing; its ``obs`` is read without the matrix when not loaded."""

    def __init__(
        self, path: Path | None = None, adata: Any = None, load: Callable[[], Any] | None = None
    ) -> None:
        import anndata

        self.path = path
        if adata is not None:
            super().__init__(value=adata, loaded=True)
        elif path is not None:
            super().__init__(load=lambda: anndata.read_h5ad(path))
        else:
            super().__init__(load=load)

    def obs(self) -> pd.DataFrame:
        if self._loaded or self.path is None:
            return self.get().obs
        import anndata

        backed = anndata.read_h5ad(self.path, backed="r")
        try:
            return backed.obs.copy()
        finally:
            backed.file.close()


@dataclass(frozen=True)
class SampleValue:
    """A sampler's output: the cells and weights, and the obs columns it computed for all cells."""

    sample: CellSample
    obs: pd.DataFrame


@dataclass(frozen=True)
class TokenValue:
    """The tokens of every prepared cell (in AnnData order) and the fitted tokenizer."""

    tokens: TokenizedCells
    tokenizer: Tokenizer | None


@dataclass
class DataMeta:
    """What the data stage keeps without the matrix: its shape, obs columns and shipped network."""

    n_obs: int
    n_vars: int
    obs_columns: list[str]
    ground_truth: GroundTruth | None
    #: every network the source ships, by name
    ground_truths: dict[str, GroundTruth] = field(default_factory=dict)


@dataclass
class StageReport:
    stage: str
    cached: bool
    seconds: float


@dataclass
class LeafResult:
    """What one leaf recipe produced."""

    metrics: dict[str, float] = field(default_factory=dict)
    interactions: dict[str, Interactions] = field(default_factory=dict)
    evaluations: dict[str, EvaluationResult] = field(default_factory=dict)
    sample: SampleValue | None = None
    stages: list[StageReport] = field(default_factory=list)
    data_key: str = ""
    context_factory: Callable[[], RunContext] | None = None

    @property
    def cached_stages(self) -> list[str]:
        return [report.stage for report in self.stages if report.cached]

    @property
    def context(self) -> RunContext | None:
        """A context holding every value of the leaf (loads the data: for the Python API and tests)."""
        return self.context_factory() if self.context_factory is not None else None


class Executor:
    """Runs leaf recipes; the only place that computes keys, uses the cache, logs stages and fires hooks.

    One executor serves every leaf of a ``grnx run`` (repeats, reference, sweep points), so stages
    they share are computed once even with the cache off.
    """

    def __init__(
        self, cache: Cache, plugin_manager: Any = None, say: Callable[[str], None] | None = None
    ) -> None:
        self.cache = cache
        self.plugin_manager = plugin_manager
        self.say = say or (lambda message: None)
        self.memo: dict[str, Any] = {}

    def hook(self, name: str, **kwargs: Any) -> None:
        if self.plugin_manager is not None:
            getattr(self.plugin_manager.hook, name)(**kwargs)

    def run(self, resolved: ResolvedRecipe, logger: RunLogger | None = None) -> LeafResult:
        return _Leaf(self, resolved, logger or NullLogger()).run()


def _where_of(step: ResolvedStep) -> dict[str, list[Any]] | None:
    """An extractor's ``where``: the obs values that narrow its cell set (None: every cell of it)."""
    return getattr(step.spec, "where", None)


def default_cells(step: ResolvedStep, has_sampler: bool) -> str:
    """The cell set a step consumes when the recipe does not say (see ``cells:`` in the recipe)."""
    given = getattr(step.spec, "cells", None)
    if given is not None:
        return given
    if step.section == "model":
        return "train"
    declared = getattr(step.component_class, "default_cells", None)
    if declared is not None:
        return declared
    return "sample" if has_sampler else "all"


class _Leaf:
    """One leaf recipe's stages: keys planned up front, values resolved on demand."""

    def __init__(self, executor: Executor, resolved: ResolvedRecipe, logger: RunLogger) -> None:
        self.x = executor
        self.cache = executor.cache
        self.resolved = resolved
        self.recipe = resolved.recipe
        self.logger = logger
        data = self.recipe.data
        self.roles = DataRoles(
            label_key=data.label_key,
            donor_key=data.donor_key,
            batch_key=data.batch_key,
            cell_type_key=data.cell_type_key,
        )
        self.result = LeafResult()
        self.keys: dict[str, str] = {}
        self.summary_context = RunContext(
            seed=self.recipe.seed,
            roles=self.roles,
            train_settings=self.recipe.train,
            execution=self.recipe.execution,
            logger=logger,
            extras={"recipe_name": self.recipe.name},
        )
        #: stage id -> value, for the stages this leaf resolved (each is logged once per leaf)
        self.local: dict[str, Lazy] = {}
        self._raw: PreparedData | None = None
        self._plan()

    # -- keys ---------------------------------------------------------------------------------

    @staticmethod
    def _identity(step: ResolvedStep) -> dict[str, Any]:
        return component_identity(
            step.spec.name, step.component_class, step.params, step.plugin, step.plugin_version
        )

    def _files(self, component: Any) -> list[str]:
        memo_dir = self.cache.root if self.cache.writable else None
        return [input_file_digest(path, memo_dir) for path in component.input_files()]

    def _plan(self) -> None:
        resolved = self.resolved
        data_step = resolved.step("data")
        assert data_step is not None
        self.data_step = data_step
        self.source = _build(data_step, DataSource)
        key = self.keys["data"] = step_key(
            stage="data", component=self._identity(data_step), files=self._files(self.source)
        )
        self.preprocess: list[tuple[str, ResolvedStep, str]] = []
        for index, step in enumerate(resolved.steps_of("preprocess")):
            key = step_key(stage="preprocess", input=key, component=self._identity(step))
            self.preprocess.append((f"preprocess:{index}:{step.spec.name}", step, key))
        self.keys["prepared"] = key
        self.sampler_step = resolved.step("sampler")
        if self.sampler_step is not None:
            spec = self.recipe.sampler
            assert spec is not None
            self.sampler_seed = spec.seed if spec.seed is not None else self.recipe.seed
            self.keys["sample"] = step_key(
                stage="sample", input=key, component=self._identity(self.sampler_step), seed=self.sampler_seed
            )
        self.tokenizer_step = resolved.step("tokenizer")
        if self.tokenizer_step is not None:
            component = self.tokenizer_step.build()
            files = self._files(component)
            self.keys["tokens"] = step_key(
                stage="tokenize",
                input=key,
                component=self._identity(self.tokenizer_step),
                files=files,
                carried=self._carried_roles(),
                fitted_on="train",
            )
        self.model_step = resolved.step("model")
        if self.model_step is not None:
            reads = (
                "tokens"
                if getattr(self.model_step.component_class, "input_kind", "tokens") == "tokens"
                else "data"
            )
            self.keys["model"] = step_key(
                stage="model",
                input=self._key_of(reads),
                cells=self._cells_key(default_cells(self.model_step, False)),
                component=self._identity(self.model_step),
                # how training is checkpointed changes no weight: resuming a killed run keeps its key
                train=self.recipe.train.model_dump(
                    mode="json", exclude={"resume", "checkpoint_every_steps", "gradient_checkpointing"}
                ),
                seed=self.recipe.seed,
                roles=self.roles.__dict__,
            )
        for step in resolved.steps_of("extractors"):
            needs = self._needs(step)
            self.keys[f"extract:{step.step_id}"] = step_key(
                stage="extract",
                # the entry's files are named after the step: two steps alike but for their id
                # must not share one
                step_id=step.step_id,
                component=self._identity(step),
                inputs={
                    need: self._key_of(need)
                    for need in sorted(needs)
                    if need not in ("cells", "interactions")
                },
                cells=self._cells_key(self._cells_of(step), _where_of(step)),
                files=self._files(step.build()),
                seed=self.recipe.seed,
                roles=self.roles.__dict__,
            )
        self.result.data_key = self.keys["data"]

    def _carried_roles(self) -> list[str]:
        roles = self.roles
        wanted = [roles.label_key, roles.donor_key, roles.batch_key, roles.cell_type_key, roles.split_key]
        return [c for c in dict.fromkeys(wanted) if c is not None]

    def _needs(self, step: ResolvedStep) -> set[str]:
        available = {"data", "cells", "ground_truth"}
        if self.tokenizer_step is not None:
            available |= {"tokens", "tokenizer"}
        if self.model_step is not None:
            available.add("model")
        if step.section == "evaluators":
            available.add("interactions")
        declared = set(available if step.needs is None else step.needs)
        if "model_inputs" in declared and self.model_step is not None:
            declared.add(
                "tokens"
                if getattr(self.model_step.component_class, "input_kind", "tokens") == "tokens"
                else "data"
            )
        return declared & available

    def _key_of(self, need: str) -> str:
        return {
            "data": self.keys["prepared"],
            "tokens": self.keys.get("tokens", ""),
            "tokenizer": self.keys.get("tokens", ""),
            "model": self.keys.get("model", ""),
            "ground_truth": self.keys["data"],
        }[need]

    def _cells_of(self, step: ResolvedStep) -> str:
        return default_cells(step, self.sampler_step is not None)

    def _cells_key(self, cells: str, where: dict[str, list[Any]] | None = None) -> Any:
        if cells == "sample":
            key: list[Any] = ["sample", self.keys["sample"]]
        elif cells in ("train", "test"):
            key = [cells, self.roles.split_key]
        else:
            key = ["all"]
        if where:  # values compare as text, as cells() filters them
            key += ["where", {column: sorted(map(str, values)) for column, values in sorted(where.items())}]
        return key

    # -- bookkeeping --------------------------------------------------------------------------

    def _finished(self, stage: str, cached: bool, started: float) -> None:
        seconds = time.perf_counter() - started
        self.result.stages.append(StageReport(stage, cached, seconds))
        self.x.say(f"{stage}: {'cached' if cached else f'done in {seconds:.1f} s'}")
        self.x.hook("grnx_stage_finished", context=self.summary_context, stage=stage, cached=cached)

    def _stage(
        self,
        stage: str,
        cache_stage: str,
        key: str,
        compute: Callable[[Path, RecordingLogger], Any],
        load: Callable[[Path], Any],
        memoize: bool = True,
    ) -> Lazy:
        """Serve ``stage`` from this leaf, the run's memo or the cache (replaying what it logged),
        or compute and store it. ``load(folder)`` rebuilds the value from a cache entry."""
        if stage in self.local:
            return self.local[stage]
        started = time.perf_counter()
        memo = self.x.memo
        if key in memo:
            value, events, folder = memo[key]
            replay_events(events, folder, self.logger)
            cached = True
        elif (hit := self.cache.lookup(cache_stage, key)) is not None:
            value = Lazy(load=lambda: load(hit))
            events, folder, cached = _recorded(hit), hit, True
            replay_events(events, hit, self.logger)
        else:
            self.x.say(f"{stage}: running")  # long stages are announced when they start, not only when done
            stored = True
            try:
                with self.cache.store(cache_stage, key) as scratch:
                    recorder = RecordingLogger(self.logger, scratch)
                    result = compute(scratch, recorder)
                    recorder.save()
            except _SkipCache as skipped:
                result, stored = skipped.value, False
            folder = self.cache.path(cache_stage, key) if stored and self.cache.writable else None
            if isinstance(result, _FromEntry):
                assert folder is not None, "a compute that leaves its value in the entry needs the cache"
                value = Lazy(load=lambda: load(folder))
            else:
                value = Lazy(value=result)
            events, cached = recorder.events, False
        if memoize:
            memo[key] = (value, events, folder)
        self.local[stage] = value
        self._finished(stage, cached, started)
        return value

    def _replay_only(self, stage: str, key: str) -> None:
        """Report a preprocess step that a later cached step makes unnecessary to load."""
        started = time.perf_counter()
        hit = self.cache.lookup("preprocess", key)
        if hit is not None:
            replay(hit, self.logger)
        self.local[stage] = Lazy(value=None)
        self._finished(stage, True, started)

    # -- values -------------------------------------------------------------------------------

    def data(self) -> DataMeta:
        """The data stage: shape, obs columns and shipped network; the matrix itself is ``raw()``."""
        key = self.keys["data"]

        def compute(folder: Path, recorder: RecordingLogger) -> DataMeta:
            adata = self._load_source()
            network = self.source.ground_truth()
            meta = {
                "n_obs": int(adata.n_obs),
                "n_vars": int(adata.n_vars),
                "obs_columns": list(map(str, adata.obs.columns)),
                "directed": bool(self.source.ground_truth_directed()),
                "name": self.data_step.spec.name,
            }
            if network is not None:
                network.to_parquet(folder / "ground_truth.parquet")
            named = self.source.ground_truths()
            if named:
                (folder / NAMED_TRUTHS).mkdir()
                for truth_name, frame in named.items():
                    frame.to_parquet(folder / NAMED_TRUTHS / f"{truth_name}.parquet")
            (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
            recorder.set_tags({"grnx.data_digest": key})
            recorder.log_metrics({"data/n_cells": adata.n_obs, "data/n_genes": adata.n_vars})
            self._raw = PreparedData(adata=adata)
            return _meta_from(meta, network, named)

        meta: DataMeta = self._stage("data", "data", key, compute, _load_meta).get()
        self._check_roles_in(meta.obs_columns)  # the roles may have changed since the data was cached
        return meta

    def raw(self) -> PreparedData:
        """The data source's AnnData, loaded at most once per leaf (once per run without preprocessing)."""
        self.data()
        if not self.preprocess:  # the raw data is what every stage reads: share it across leaves
            shared = self.x.memo.setdefault(
                "adata:" + self.keys["data"], self._raw or PreparedData(load=self._load_source)
            )
            self._raw = shared
        if self._raw is None:
            self._raw = PreparedData(load=self._load_source)
        return self._raw

    def _load_source(self) -> Any:
        adata = self.source.load()
        self._check_roles(adata)
        return adata

    def _check_roles(self, adata: Any) -> None:
        self._check_roles_in(list(map(str, adata.obs.columns)))

    def _check_roles_in(self, columns: list[str]) -> None:
        for role in ROLE_NAMES:
            column = getattr(self.roles, role)
            if column is not None and column not in columns:
                raise DataError(
                    f"data.{role} is {column!r}, but the data from {self.data_step.spec.name!r} has no such obs "
                    f"column. Available: {', '.join(columns[:20]) or 'none'}."
                )

    def prepared(self) -> PreparedData:
        """The AnnData after every preprocess step. Steps are cached one by one; only the output of
        the last cached step is read, and only when a step after it computes."""
        if "prepared" in self.local:
            return self.local["prepared"].get()
        if not self.preprocess:
            value = self.raw()
        else:
            last_cached = -1
            for index in range(len(self.preprocess) - 1, -1, -1):
                key = self.preprocess[index][2]
                if key in self.x.memo or self.cache.lookup("preprocess", key) is not None:
                    last_cached = index
                    break
            for stage, _, key in self.preprocess[: max(last_cached, 0)]:
                self._replay_only(stage, key)
            previous: PreparedData | None = None
            for index in range(max(last_cached, 0), len(self.preprocess)):
                stage, step, key = self.preprocess[index]
                before = previous if previous is not None else self.raw()

                def compute(
                    folder: Path,
                    recorder: RecordingLogger,
                    step: ResolvedStep = step,
                    before: PreparedData = before,
                    stage: str = stage,
                ) -> PreparedData:
                    return self._preprocess_step(folder, recorder, step, before, stage)

                previous = self._stage(
                    stage,
                    "preprocess",
                    key,
                    compute,
                    _load_prepared,
                    memoize=index == len(self.preprocess) - 1,
                ).get()
            assert previous is not None
            value = previous
        self.local["prepared"] = Lazy(value=value)
        return value

    def _preprocess_step(
        self, folder: Path, recorder: RecordingLogger, step: ResolvedStep, before: PreparedData, stage: str
    ) -> PreparedData:
        # Intermediate outputs are never shared (only the last step's is memoised), so the
        # preprocessor may change its input in place, as scanpy functions do.
        component = _build(step, Preprocessor)
        adata = component(before.get())
        if adata is None:
            raise GrnxError(f"preprocessor {step.spec.name!r} returned nothing; it must return the AnnData.")
        index = stage.split(":")[1]
        for name, figure in component.figures(adata).items():
            recorder.log_figure(f"figures/preprocess/{int(index):02d}_{step.spec.name}_{name}.png", figure)
        recorder.log_metrics(
            {"data/n_cells_preprocessed": adata.n_obs, "data/n_genes_preprocessed": adata.n_vars}
        )
        if self.cache.writable:
            try:
                adata.write_h5ad(folder / "adata.h5ad")
            except Exception as error:  # an unserialisable uns entry must not fail the run
                log.warning("%s output not cached: %s", stage, error)
                raise _SkipCache(PreparedData(adata=adata)) from error
        return PreparedData(adata=adata)

    def cells(self, name: str, where: dict[str, list[Any]] | None = None) -> CellSample | None:
        """The rows of the prepared data in cell set ``name``, of them those whose obs columns take
        the values of ``where``; None means all cells, unweighted."""
        chosen = self._cell_set(name)
        if not where:
            return chosen
        obs = self.prepared().obs()
        keep = np.ones(len(obs), dtype=bool)
        for column, values in where.items():
            if column not in obs.columns:
                raise DataError(
                    f"where: obs column {column!r} is not in the data (columns: "
                    f"{', '.join(map(str, obs.columns[:20]))}). Fix the step's where."
                )
            wanted = set(map(str, values))
            present = obs[column].astype(str)
            matches = present.isin(wanted).to_numpy()
            keep &= matches
            if not matches.any():
                raise DataError(
                    f"where: no cell has {column} in {sorted(wanted)}; values present: "
                    f"{', '.join(sorted(map(str, present.unique()))[:10])}."
                )
        indices = np.arange(len(obs)) if chosen is None else chosen.indices
        weights = np.ones(len(obs)) if chosen is None else chosen.weights
        inside = keep[indices]
        if not inside.any():
            raise DataError(
                f"where: none of the {len(indices)} cells of cell set {name!r} has "
                + " and ".join(f"{c} in {sorted(map(str, v))}" for c, v in where.items())
                + ". Use a larger sample or cells: all."
            )
        info: dict[str, float | int | str] = dict(chosen.info) if chosen is not None else {"cells": name}
        info["where"] = json.dumps({c: sorted(map(str, v)) for c, v in sorted(where.items())})
        return CellSample(indices[inside], weights[inside], n_cells_total=len(obs), info=info)

    def _cell_set(self, name: str) -> CellSample | None:
        if name == "all":
            return None
        if name == "sample":
            return self.sample().sample
        split_key = self.roles.split_key
        obs = self.prepared().obs()
        if split_key not in obs.columns:
            if name == "train":  # no split: every cell is a training cell
                return None
            raise DataError(
                f"cells: test needs a train/test split, but the data has no {split_key!r} column. "
                "Add the 'split' preprocessor, or use cells: all."
            )
        indices = np.flatnonzero(obs[split_key].astype(str).to_numpy() == name)
        if len(indices) == 0:
            raise DataError(f"cells: {name} is empty: no cell has {split_key} == {name!r}.")
        return CellSample(indices, np.ones(len(indices)), n_cells_total=len(obs), info={"cells": name})

    def sample(self) -> SampleValue:
        step = self.sampler_step
        assert step is not None

        def compute(folder: Path, recorder: RecordingLogger) -> SampleValue:
            adata = self.prepared().get()
            sampler = _build(step, Sampler)
            original = adata.obs
            adata.obs = original.copy()  # the sampler's columns belong to this sample, not the shared data
            try:
                sample = sampler.sample(adata, _rng(self.sampler_seed, "sampler"))
                added = adata.obs[[c for c in adata.obs.columns if c not in original.columns]].copy()
                figures = sampler.figures(adata) if hasattr(sampler, "figures") else {}
            finally:
                adata.obs = original
            if not isinstance(sample, CellSample):
                raise GrnxError(
                    f"sampler {step.spec.name!r} returned {type(sample).__name__}, not CellSample."
                )
            sample.save(folder / "sample.npz")
            added.to_parquet(folder / "obs.parquet")
            for name, figure in figures.items():
                recorder.log_figure(f"figures/sample/{name}.png", figure)
            metrics: dict[str, float] = {"sample/n_cells": sample.n_cells}
            metrics.update({f"sample/{k}": v for k, v in sample.info.items() if isinstance(v, (int, float))})
            recorder.log_metrics(metrics)
            return SampleValue(sample, added)

        return self._stage("sample", "sample", self.keys["sample"], compute, _load_sample).get()

    def tokens(self) -> TokenValue:
        return self._tokens_stage().get()

    def _tokens_stage(self) -> Lazy:
        """The tokenize stage; its value (the token files) is loaded only on ``get()``."""
        step = self.tokenizer_step
        assert step is not None

        def compute(folder: Path, recorder: RecordingLogger) -> Any:
            prepared = self.prepared()
            adata = prepared.get()
            tokenizer = _build(step, Tokenizer)
            train = self.cells("train")
            tokenizer.fit(adata if train is None else adata[train.indices])
            carried = [c for c in self._carried_roles() if c in adata.obs.columns]
            streams = "path" in inspect.signature(tokenizer.transform).parameters
            if streams:  # written chunk by chunk into the cache, never whole in memory
                streaming: Any = tokenizer  # ``path`` extends the base class's transform signature
                streaming.transform(adata, obs_columns=carried, path=folder / "tokens")
                tokens = (
                    TokenizedCells.load(folder / "tokens", mmap=False) if not self.cache.writable else None
                )
            else:
                tokens = tokenizer.transform(adata, obs_columns=carried)
                tokens.save(folder / "tokens")
            _save_tokenizer(tokenizer, folder / "tokenizer")
            write_artifacts = getattr(tokenizer, "write_artifacts", None)
            if write_artifacts is not None:  # files derived from the tokens, e.g. rank_value's `export`
                for artifact_dir, file in write_artifacts(folder / "tokens", folder / "exports").items():
                    recorder.log_artifact(file, artifact_dir)
                shutil.rmtree(folder / "exports", ignore_errors=True)  # the recorder keeps its copy
            # Streamed tokens are not read back whole just to count them: only their offsets.
            lengths = tokens.lengths if tokens is not None else TokenizedCells.load_lengths(folder / "tokens")
            recorder.log_metrics(
                {
                    "tokens/n_cells": len(lengths),
                    "tokens/mean_length": float(lengths.mean()) if len(lengths) else 0.0,
                }
            )
            if tokens is None:
                return _FromEntry()
            return TokenValue(tokens, tokenizer)

        first_time = "tokenize" not in self.local
        value = self._stage("tokenize", "tokenize", self.keys["tokens"], compute, self._load_tokens)
        if first_time:
            # Where the tokens are, once the entry is stored (`grnx export tokens RUN_ID` reads the tag).
            if self.cache.enabled:
                where = self.cache.path("tokenize", self.keys["tokens"])
                self.logger.set_tags({TOKENS_PATH_TAG: str(where / "tokens")})
                self.x.say(f"tokens: {where / 'tokens'}")
            else:
                self.x.say("tokens: not kept (the cache is off)")
        return value

    def _load_tokens(self, folder: Path) -> TokenValue:
        tokenizer = None
        if (folder / "tokenizer").is_dir():
            assert self.tokenizer_step is not None
            tokenizer = _component_class(self.tokenizer_step, Tokenizer).load(folder / "tokenizer")
        return TokenValue(TokenizedCells.load(folder / "tokens"), tokenizer)

    def model(self) -> Lazy:
        step = self.model_step
        assert step is not None
        key = self.keys["model"]

        def compute(folder: Path, recorder: RecordingLogger) -> Any:
            context = self.context_for(step, default_cells(step, False), recorder)
            # Training checkpoints live beside the cache entry, outside the scratch folder, so that a
            # killed run leaves them for `train.resume: true`; they go once the model is saved. Every
            # process of a multi-process launch reads them there (the main one writes them).
            work = self.cache.root / "model" / key[:2] / f".{key}.work" if self.cache.enabled else folder
            context.work_dir = work
            model = _build(step, Model)
            model.fit(context)
            if self.cache.read_only:  # another process of the launch (the main one) saves and logs it
                return model
            model.save(folder / "model")
            if work != folder:
                shutil.rmtree(work, ignore_errors=True)
            if not self.cache.enabled:  # the folder is thrown away: log the model from it now
                self.logger.log_artifact(folder / "model", "model")
            return model

        first_time = "model" not in self.local
        value = self._stage(
            "model",
            "model",
            key,
            compute,
            lambda folder: self._loaded_model(step, folder / "model"),
        )
        entry = self.cache.lookup("model", key)
        if first_time and entry is not None:
            # One artifact per `grnx run`: a model shared by every repeat is logged to the first run
            # that uses it, and the others point to that run.
            logged_in = self.x.memo.setdefault("model-logged-in", {})
            if key not in logged_in:
                self.logger.log_artifact(entry / "model", "model")
                logged_in[key] = getattr(self.logger, "run_id", None)
            elif logged_in[key]:
                self.logger.set_tags({"grnx.model_artifact_run": logged_in[key]})
        return value

    def _loaded_model(self, step: ResolvedStep, folder: Path) -> Model:
        """A cached model, placed where the recipe trains (a model trained on a GPU keeps running there)."""
        model = _component_class(step, Model).load(folder)
        model.use_device(self.recipe.train.device)
        return model

    def interactions(self, step: ResolvedStep) -> Interactions:
        step_id = step.step_id

        def compute(folder: Path, recorder: RecordingLogger) -> Interactions:
            context = self.context_for(step, self._cells_of(step), recorder)
            context.extras["step_id"] = step_id  # components name their artifacts after the step
            extractor = _build(step, Extractor)
            interactions = extractor.extract(context)
            if not isinstance(interactions, Interactions):
                raise GrnxError(
                    f"extractor {step.spec.name!r} returned {type(interactions).__name__}, not Interactions."
                )
            direction = extractor.output_direction()
            if interactions.directed != (direction != "undirected"):
                raise GrnxError(
                    f"extractor {step.spec.name!r} declares its output {direction!r} but returned "
                    f"{'directed' if interactions.directed else 'undirected'} interactions."
                )
            # Evaluators and exports read what source -> target means from the saved pairs.
            interactions.metadata["direction"] = direction
            interactions.extractor = step_id
            # Written once, where the stage's record keeps its artifacts: the cache entry holds one copy.
            named = recorder.artifact_file(f"interactions/{step_id}.parquet")
            interactions.save(named)
            recorder.log_artifact(named, "interactions")
            recorder.log_metrics({f"interactions/{step_id}/n_pairs": len(interactions)})
            return interactions

        def load(folder: Path) -> Interactions:
            return Interactions.load(artifact_path(folder, f"interactions/{step_id}.parquet"))

        return self._stage(
            f"extract:{step_id}", "extract", self.keys[f"extract:{step_id}"], compute, load
        ).get()

    # -- contexts -----------------------------------------------------------------------------

    def context_for(self, step: ResolvedStep, cells: str, logger: RunLogger) -> RunContext:
        """The narrow context a component computes from: only what it needs, for its cell set."""
        needs = self._needs(step) if step.section != "model" else self._model_needs(step)
        context = RunContext(
            seed=self.recipe.seed,
            roles=copy.copy(self.roles),
            train_settings=self.recipe.train,
            execution=self.recipe.execution,
            logger=logger,
        )
        chosen = (
            self.cells(cells, _where_of(step)) if "cells" in needs or needs & {"data", "tokens"} else None
        )
        context.sample = chosen
        context.extras["cells"] = cells
        if "data" in needs:
            context.adata = self.prepared().get()
        if "ground_truth" in needs:
            meta = self.data()
            context.ground_truth, context.ground_truths = meta.ground_truth, dict(meta.ground_truths)
        if needs & {"tokens", "tokenizer"}:
            token_value = self.tokens()
            tokens = token_value.tokens
            context.tokens = tokens if chosen is None else tokens.subset(chosen.indices)
            context.tokenizer = token_value.tokenizer
        if "model" in needs:
            context.model = self.model().get()
        if "interactions" in needs:
            context.interactions = dict(self.result.interactions)
        context.extras["data_digest"] = self.keys["data"]
        return context

    def _model_needs(self, step: ResolvedStep) -> set[str]:
        reads = "tokens" if getattr(step.component_class, "input_kind", "tokens") == "tokens" else "data"
        return {reads, "cells"}

    def full_context(self) -> RunContext:
        context = RunContext(
            seed=self.recipe.seed,
            roles=copy.copy(self.roles),
            train_settings=self.recipe.train,
            execution=self.recipe.execution,
        )
        meta = self.data()
        context.adata = self.prepared().get()
        context.ground_truth, context.ground_truths = meta.ground_truth, dict(meta.ground_truths)
        if self.sampler_step is not None:
            context.sample = self.sample().sample
        if self.tokenizer_step is not None:
            token_value = self.tokens()
            context.tokens, context.tokenizer = token_value.tokens, token_value.tokenizer
            if context.sample is not None:
                context.tokens = context.tokens.subset(context.sample.indices)
        if self.model_step is not None:
            context.model = self.model().get()
        context.interactions = dict(self.result.interactions)
        context.metrics = dict(self.result.metrics)
        context.extras["evaluations"] = dict(self.result.evaluations)
        return context

    # -- the leaf -----------------------------------------------------------------------------

    def run(self) -> LeafResult:
        result = self.result
        meta = self.data()
        self.summary_context.ground_truth = meta.ground_truth
        self.prepared()  # logs every preprocess step; reads no matrix when the last one is cached
        if self.sampler_step is not None:
            result.sample = self.sample()
        if self.tokenizer_step is not None:  # runs even when no later stage reads the tokens
            self._tokens_stage()
        if self.model_step is not None:
            self.model()
        for step in self.resolved.steps_of("extractors"):
            result.interactions[step.step_id] = self.interactions(step)
        for step in self.resolved.steps_of("evaluators"):
            self.evaluate(step)
        result.context_factory = self.full_context
        return result

    def evaluate(self, step: ResolvedStep) -> EvaluationResult:
        started = time.perf_counter()
        evaluator = _build(step, Evaluator)
        shared_key = self._shared_evaluation_key(step, evaluator)
        if shared_key is not None and shared_key in self.x.memo:
            result = self.x.memo[shared_key]
        else:
            context = self.context_for(step, self._cells_of(step), self.logger)
            result = evaluator.evaluate(context)
            if shared_key is not None:
                self.x.memo[shared_key] = result
        if not isinstance(result, EvaluationResult):
            raise GrnxError(
                f"evaluator {step.spec.name!r} returned {type(result).__name__}, not EvaluationResult."
            )
        step_id = step.step_id
        undeclared = [name for name in result.metrics if not evaluator.declares(name)]
        if undeclared:
            raise GrnxError(
                f"evaluator {step.spec.name!r} returned metrics declared in neither its higher_is_better nor "
                f"its informational: {', '.join(undeclared[:5])}. This is a bug in the plugin."
            )
        metrics = {f"eval/{step_id}/{name}": float(value) for name, value in result.metrics.items()}
        self.result.metrics.update(metrics)
        self.result.evaluations[step_id] = result
        self.logger.log_metrics(metrics)
        for name, figure in result.figures.items():
            self.logger.log_figure(f"eval/figures/{step_id}_{name}.png", figure)
        for name, table in result.tables.items():
            self.logger.log_table(f"eval/tables/{step_id}_{name}.csv", table)
        self._finished(f"evaluate:{step_id}", False, started)
        return result

    def _shared_evaluation_key(self, step: ResolvedStep, evaluator: Evaluator) -> str | None:
        """A memo key for an evaluation that reads neither the sample nor the interactions (a model's
        held-out accuracy): every repeat and sweep child of one ``grnx run`` with the same model,
        data and cells shares one computation. None when the evaluation depends on the leaf."""
        needs = self._needs(step)
        cells = self._cells_of(step)
        if "interactions" in needs or cells == "sample":
            return None
        return step_key(
            stage="evaluate",
            step_id=step.step_id,
            component=self._identity(step),
            inputs={need: self._key_of(need) for need in sorted(needs) if need != "cells"},
            cells=self._cells_key(cells),
            files=self._files(evaluator),
            seed=self.recipe.seed,
            roles=self.roles.__dict__,
        )


class _FromEntry:
    """Returned by a compute that wrote its value into the entry: load it from there once stored."""


def _rng(seed: int, stream: str) -> np.random.Generator:
    return RunContext(seed=seed).rng(stream)


#: folder of a data cache entry holding each named network of the source as <name>.parquet
NAMED_TRUTHS = "ground_truths"


def _meta_from(
    meta: dict[str, Any], network: pd.DataFrame | None, named: dict[str, pd.DataFrame] | None = None
) -> DataMeta:
    truth = None
    if network is not None:
        truth = GroundTruth(network, directed=meta["directed"], name=meta["name"])
    truths = {
        key: GroundTruth(frame, directed=meta["directed"], name=f"{meta['name']}:{key}")
        for key, frame in (named or {}).items()
    }
    return DataMeta(meta["n_obs"], meta["n_vars"], meta["obs_columns"], truth, truths)


def _load_meta(folder: Path) -> DataMeta:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    path = folder / "ground_truth.parquet"
    named = {file.stem: pd.read_parquet(file) for file in sorted((folder / NAMED_TRUTHS).glob("*.parquet"))}
    return _meta_from(meta, pd.read_parquet(path) if path.exists() else None, named)


def _load_prepared(folder: Path) -> PreparedData:
    return PreparedData(path=folder / "adata.h5ad")


def _load_sample(folder: Path) -> SampleValue:
    return SampleValue(CellSample.load(folder / "sample.npz"), pd.read_parquet(folder / "obs.parquet"))


def _save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    """Save the fitted tokenizer beside its tokens; a tokenizer whose state cannot be saved is logged."""
    try:
        tokenizer.save(path)
    except GrnxError as error:
        log.warning("fitted tokenizer not saved (%s); later stages get it only in this run", error)


def _recorded(folder: Path) -> list[dict[str, Any]]:
    record = folder / RECORD_FILE
    return json.loads(record.read_text(encoding="utf-8")) if record.is_file() else []


__all__ = ["Executor", "LeafResult", "SampleValue", "TokenValue", "default_cells"]
