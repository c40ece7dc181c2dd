"""The runner: runs a validated recipe's stages in order, with caching and tracking.

Stages: data -> preprocess -> sample -> tokenize -> model -> extract -> evaluate. Stages the recipe
omits are skipped. Each expensive stage's output is cached under a key chained from the data
digest, so a rerun (or a run killed part-way) starts from the last finished stage. With
``sampler.repeats > 1`` the stages from the sampler on run once per seed as nested runs, and the
parent run holds the aggregates.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from grnx_core import __version__
from grnx_core.cache import Cache, anndata_digest, file_digest, step_key
from grnx_core.components import Component, Kind
from grnx_core.context import DataRoles, NullLogger, RunContext
from grnx_core.data_types import CellSample, EvaluationResult, GroundTruth, Interactions, TokenizedCells
from grnx_core.errors import DataError, GrnxError
from grnx_core.recipe import ResolvedRecipe, ResolvedStep, flatten

log = logging.getLogger("grnx")


@dataclass
class RunResult:
    """What a run produced; ``metrics`` are the parent run's metrics (aggregates when repeated)."""

    run_id: str | None
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    interactions: dict[str, Interactions] = field(default_factory=dict)
    cached_stages: list[str] = field(default_factory=list)
    child_run_ids: list[str] = field(default_factory=list)
    context: RunContext | None = None


def _component_identity(step: ResolvedStep) -> dict[str, Any]:
    """What a step's output depends on besides its input: code, version, params, files it reads."""
    cls = step.component_class
    identity = {
        "name": step.spec.name,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "version": cls.version(),
        "params": step.params.model_dump(mode="json"),
    }
    if hasattr(cls, "input_files") and step.kind is not Kind.DATA:  # data is keyed by its content digest
        identity["files"] = [file_digest(path) for path in step.build().input_files()]
    return identity


def _save_figures(figures: dict[str, Any], folder: Path) -> None:
    import matplotlib.pyplot as plt

    if not figures:
        return
    target = folder / "figures"
    target.mkdir(exist_ok=True)
    for name, figure in figures.items():
        figure.savefig(target / f"{name}.png", dpi=120, bbox_inches="tight")
        plt.close(figure)


class Runner:
    """Runs one resolved recipe. ``tracker`` None runs without MLflow (used by tuning and tests)."""

    def __init__(
        self,
        resolved: ResolvedRecipe,
        *,
        tracker: Any = None,
        cache: Cache | None = None,
        plugin_manager: Any = None,
        show_progress: bool = False,
    ) -> None:
        self.resolved = resolved
        self.recipe = resolved.recipe
        self.tracker = tracker
        self.cache = cache if cache is not None else Cache(enabled=resolved.recipe.cache)
        self.plugin_manager = plugin_manager
        self.show_progress = show_progress
        self.cached_stages: list[str] = []

    # -- helpers ------------------------------------------------------------------------------

    def _hook(self, name: str, **kwargs: Any) -> None:
        if self.plugin_manager is not None:
            getattr(self.plugin_manager.hook, name)(**kwargs)

    def _say(self, message: str) -> None:
        if self.show_progress:
            print(f"[grnx] {message}", file=sys.stderr, flush=True)

    def _finished(self, context: RunContext, stage: str, cached: bool, started: float) -> None:
        if cached:
            self.cached_stages.append(stage)
        self._say(f"{stage}: {'cached' if cached else f'done in {time.perf_counter() - started:.1f} s'}")
        self._hook("grnx_stage_finished", context=context, stage=stage, cached=cached)

    @staticmethod
    def _log_folder_figures(logger: Any, folder: Path, artifact_dir: str) -> None:
        figures = folder / "figures"
        if figures.is_dir() and hasattr(logger, "log_artifact"):
            for png in sorted(figures.glob("*.png")):
                logger.log_artifact(png, artifact_dir)

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> RunResult:
        recipe = self.recipe
        tags = {
            "grnx.recipe": recipe.name,
            "grnx.recipe_version": str(recipe.version),
            "grnx.version": __version__,
            **recipe.tracking.tags,
        }
        source = self.resolved.source
        if source is not None:
            tags["grnx.recipe_path"] = str(source.path)
            tags["grnx.overrides"] = json.dumps(source.overrides)
        from grnx_core.tracking import git_commit

        commit = git_commit()
        if commit:
            tags["grnx.git_commit"] = commit
        run = None
        if self.tracker is not None:
            run = self.tracker.start_run(recipe.tracking.experiment, recipe.tracking.run_name or recipe.name, tags)
        context = RunContext(
            seed=recipe.seed,
            roles=DataRoles(
                label_key=recipe.data.label_key, donor_key=recipe.data.donor_key,
                batch_key=recipe.data.batch_key, cell_type_key=recipe.data.cell_type_key,
            ),
            recipe=recipe,
            logger=run if run is not None else NullLogger(),
        )
        result = RunResult(run_id=run.run_id if run else None, status="RUNNING", context=context)
        try:
            self._hook("grnx_run_started", context=context, run_id=result.run_id)
            if run is not None:
                self._log_recipe(run)
            data_key = self._load_data(context)
            preprocess_key = self._preprocess(context, data_key)
            sampler = self.resolved.step("sampler")
            needs_reference = sampler is not None and any(
                getattr(step.component_class, "needs_reference", False)
                for step in self.resolved.steps_of("evaluators")
            )
            if sampler is not None and (sampler.spec.repeats > 1 or needs_reference):
                self._repeats(context, preprocess_key, run, result)
            else:
                self._pipeline(context, preprocess_key)
                result.metrics = dict(context.metrics)
                result.interactions = dict(context.interactions)
            result.status = "FINISHED"
            if run is not None:
                run.set_tags({"grnx.cached_stages": ",".join(self.cached_stages) or "none"})
                run.end("FINISHED")
        except BaseException as error:
            result.status = "FAILED"
            if run is not None:
                reason = "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
                run.set_tags({"grnx.error": reason, "grnx.error_type": type(error).__name__})
                run.end("FAILED")
            self._hook("grnx_run_finished", context=context, status="FAILED", error=error)
            raise
        result.cached_stages = list(self.cached_stages)
        self._hook("grnx_run_finished", context=context, status="FINISHED", error=None)
        return result

    def _log_recipe(self, run: Any) -> None:
        resolved = self.resolved
        run.log_params(flatten(resolved.to_dict()))
        run.log_text(resolved.to_yaml(), "recipe/resolved.yaml")
        if resolved.source is not None:
            run.log_text(resolved.source.given_text, "recipe/given.yaml")
            run.log_text("\n".join(resolved.source.overrides) + "\n", "recipe/overrides.txt")
        versions = {}
        for step in resolved.steps:
            entry_module = step.component_class.__module__
            versions[f"plugin.{step.kind.value}.{step.spec.name}"] = (
                f"{entry_module} v{step.component_class.version()}"
            )
        from grnx_core.registry import default_registry

        for plugin, version in default_registry().plugin_versions.items():
            versions[f"plugin_dist.{plugin}"] = version
        run.set_tags(versions)

    # -- stages -------------------------------------------------------------------------------

    def _load_data(self, context: RunContext) -> str:
        started = time.perf_counter()
        step = self.resolved.step("data")
        assert step is not None
        source = step.build()
        adata = source.load()
        roles = context.roles
        for role in ("label_key", "donor_key", "batch_key", "cell_type_key"):
            key = getattr(roles, role)
            if key is not None and key not in adata.obs.columns:
                raise DataError(
                    f"data.{role} is {key!r}, but the data from {step.spec.name!r} has no such obs column. "
                    f"Available: {', '.join(map(str, adata.obs.columns[:20])) or 'none'}."
                )
        digest = anndata_digest(adata)
        network = source.ground_truth()
        if network is not None:
            context.ground_truth = GroundTruth(network, directed=source.ground_truth_directed(), name=step.spec.name)
        context.adata = adata
        context.extras["data_digest"] = digest
        logger = context.logger
        if hasattr(logger, "set_tags"):
            logger.set_tags({"grnx.data_digest": digest})
        logger.log_metrics({"data/n_cells": adata.n_obs, "data/n_genes": adata.n_vars})
        self._finished(context, "data", False, started)
        return step_key(stage="data", digest=digest, component=_component_identity(step),
                        roles=context.roles.__dict__)

    def _preprocess(self, context: RunContext, key: str) -> str:
        steps = self.resolved.steps_of("preprocess")
        if not steps:
            return key
        started = time.perf_counter()
        key = step_key(stage="preprocess", input=key, steps=[_component_identity(s) for s in steps])
        hit = self.cache.lookup("preprocess", key)
        if hit is not None:
            import anndata

            context.adata = anndata.read_h5ad(hit / "adata.h5ad")
            self._log_folder_figures(context.logger, hit, "figures/preprocess")
            self._finished(context, "preprocess", True, started)
            return key
        adata = context.adata
        figures: dict[str, Any] = {}
        for index, step in enumerate(self._progress(steps, "preprocess")):
            component = step.build()
            adata = component(adata)
            if adata is None:
                raise GrnxError(f"preprocessor {step.spec.name!r} returned nothing; it must return the AnnData.")
            for name, figure in component.figures(adata).items():
                figures[f"{index:02d}_{step.spec.name}_{name}"] = figure
        context.adata = adata
        try:
            with self.cache.store("preprocess", key) as folder:
                _save_figures(figures, folder)
                self._log_folder_figures(context.logger, folder, "figures/preprocess")
                try:
                    adata.write_h5ad(folder / "adata.h5ad")
                except Exception as error:  # an unserialisable uns entry must not fail the run
                    log.warning("preprocess output not cached: %s", error)
                    raise _SkipCache from error
        except _SkipCache:
            pass
        context.logger.log_metrics({"data/n_cells_preprocessed": adata.n_obs, "data/n_genes_preprocessed": adata.n_vars})
        self._finished(context, "preprocess", False, started)
        return key

    def _progress(self, items: list, description: str):
        if not self.show_progress or len(items) < 2:
            return items
        from tqdm.auto import tqdm

        return tqdm(items, desc=description, file=sys.stderr, leave=False)

    def _pipeline(self, context: RunContext, key: str, use_sampler: bool = True) -> None:
        """The stages from the sampler on, in ``context`` (the run, one repeat, or the reference run
        on all cells, which skips the sampler)."""
        if use_sampler:
            key = self._sample(context, key)
        key = self._tokenize(context, key)
        key = self._model(context, key)
        for step in self.resolved.steps_of("extractors"):
            self._extract(context, step, key)
        for step in self.resolved.steps_of("evaluators"):
            self._evaluate(context, step)

    def _sample(self, context: RunContext, key: str) -> str:
        step = self.resolved.step("sampler")
        if step is None:
            return key
        started = time.perf_counter()
        key = step_key(stage="sample", input=key, component=_component_identity(step), seed=context.seed)
        adata = context.adata
        hit = self.cache.lookup("sample", key)
        if hit is not None:
            context.sample = CellSample.load(hit / "sample.npz")
            added = pd.read_parquet(hit / "obs.parquet")
            for column in added.columns:
                adata.obs[column] = added[column].to_numpy()
            self._log_folder_figures(context.logger, hit, "figures/sample")
        else:
            sampler = step.build()
            before = set(adata.obs.columns)
            context.sample = sampler.sample(adata, context.rng("sampler"))
            added = adata.obs[[c for c in adata.obs.columns if c not in before]]
            figures = sampler.figures(adata) if hasattr(sampler, "figures") else {}
            with self.cache.store("sample", key) as folder:
                context.sample.save(folder / "sample.npz")
                added.to_parquet(folder / "obs.parquet")
                _save_figures(figures, folder)
                self._log_folder_figures(context.logger, folder, "figures/sample")
        sample = context.sample
        metrics = {"sample/n_cells": sample.n_cells}
        metrics.update({f"sample/{k}": v for k, v in sample.info.items() if isinstance(v, (int, float))})
        context.logger.log_metrics(metrics)
        self._finished(context, "sample", hit is not None, started)
        return key

    def _carried_columns(self, context: RunContext) -> list[str]:
        roles = context.roles
        adata = context.adata
        wanted = [roles.label_key, roles.donor_key, roles.batch_key, roles.cell_type_key, roles.split_key]
        return [c for c in dict.fromkeys(wanted) if c is not None and c in adata.obs.columns]

    def _tokenize(self, context: RunContext, key: str) -> str:
        step = self.resolved.step("tokenizer")
        if step is None:
            return key
        started = time.perf_counter()
        key = step_key(stage="tokenize", input=key, component=_component_identity(step),
                       carried=self._carried_columns(context))
        hit = self.cache.lookup("tokenize", key)
        if hit is not None:
            context.tokens = TokenizedCells.load(hit / "tokens")
        else:
            tokenizer = step.build()
            adata = context.adata
            indices = context.sample.indices if context.sample is not None else np.arange(adata.n_obs)
            split_key = context.roles.split_key
            # Index the parent each time: backed AnnData cannot take a view of a view.
            train = indices
            if split_key in adata.obs.columns:
                is_train = adata.obs[split_key].to_numpy()[indices] == "train"
                if is_train.any():
                    train = indices[is_train]
            tokenizer.fit(adata[train])
            cells = adata[indices]
            carried = self._carried_columns(context)
            streams = "path" in inspect.signature(tokenizer.transform).parameters
            context.tokens = None
            with self.cache.store("tokenize", key) as folder:
                if streams:  # written chunk by chunk into the cache, never whole in memory
                    tokenizer.transform(cells, obs_columns=carried, path=folder / "tokens")
                    if not self.cache.enabled:
                        context.tokens = TokenizedCells.load(folder / "tokens", mmap=False)
                else:
                    context.tokens = tokenizer.transform(cells, obs_columns=carried)
                    context.tokens.save(folder / "tokens")
            if context.tokens is None:
                context.tokens = TokenizedCells.load(self.cache.path("tokenize", key) / "tokens")
        lengths = context.tokens.lengths
        context.logger.log_metrics({
            "tokens/n_cells": context.tokens.n_cells,
            "tokens/mean_length": float(lengths.mean()) if len(lengths) else 0.0,
        })
        self._finished(context, "tokenize", hit is not None, started)
        return key

    def _model(self, context: RunContext, key: str) -> str:
        step = self.resolved.step("model")
        if step is None:
            return key
        started = time.perf_counter()
        key = step_key(stage="model", input=key, component=_component_identity(step),
                       train=self.recipe.train, seed=context.seed, roles=context.roles.__dict__)
        hit = self.cache.lookup("model", key)
        if hit is not None:
            context.model = step.component_class.load(hit / "model")
        else:
            model = step.build()
            model.fit(context)
            context.model = model
            with self.cache.store("model", key) as folder:
                model.save(folder / "model")
                if hasattr(context.logger, "log_artifact"):
                    context.logger.log_artifact(folder / "model", "model")
        self._finished(context, "model", hit is not None, started)
        return key

    def _extract(self, context: RunContext, step: ResolvedStep, key: str) -> None:
        step_id = step.step_id
        stage = f"extract:{step_id}"
        started = time.perf_counter()
        key = step_key(stage="extract", input=key, component=_component_identity(step),
                       seed=context.seed, roles=context.roles.__dict__)
        hit = self.cache.lookup("extract", key)
        if hit is not None:
            interactions = Interactions.load(hit / "interactions.parquet")
            if hasattr(context.logger, "log_artifact"):
                self._log_cached_interactions(context, hit / "interactions.parquet", step_id)
        else:
            interactions = step.build().extract(context)
            if not isinstance(interactions, Interactions):
                raise GrnxError(f"extractor {step.spec.name!r} returned {type(interactions).__name__}, not Interactions.")
            interactions.extractor = step_id
            with self.cache.store("extract", key) as folder:
                named = folder / f"{step_id}.parquet"
                interactions.save(named)
                if hasattr(context.logger, "log_artifact"):
                    context.logger.log_artifact(named, "interactions")
                named.rename(folder / "interactions.parquet")
        context.interactions[step_id] = interactions
        context.logger.log_metrics({f"interactions/{step_id}/n_pairs": len(interactions)})
        self._finished(context, stage, hit is not None, started)

    @staticmethod
    def _log_cached_interactions(context: RunContext, path: Path, step_id: str) -> None:
        """Cached interactions are stored as interactions.parquet; log them as <step id>.parquet."""
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            named = Path(scratch) / f"{step_id}.parquet"
            shutil.copyfile(path, named)
            context.logger.log_artifact(named, "interactions")

    def _evaluate(self, context: RunContext, step: ResolvedStep) -> dict[str, float]:
        # Evaluations are cheap next to what they score and may read files that change, so they
        # always run.
        started = time.perf_counter()
        evaluator = step.build()
        result = evaluator.evaluate(context)
        if not isinstance(result, EvaluationResult):
            raise GrnxError(f"evaluator {step.spec.name!r} returned {type(result).__name__}, not EvaluationResult.")
        step_id = step.step_id
        undeclared = [name for name in result.metrics if evaluator.metric_direction(name) is None]
        if undeclared:
            raise GrnxError(
                f"evaluator {step.spec.name!r} returned metrics without a direction in its higher_is_better: "
                f"{', '.join(undeclared[:5])}. This is a bug in the plugin."
            )
        metrics = {f"eval/{step_id}/{name}": float(value) for name, value in result.metrics.items()}
        context.metrics.update(metrics)
        context.extras.setdefault("evaluations", {})[step_id] = result
        logger = context.logger
        logger.log_metrics(metrics)
        for name, figure in result.figures.items():
            logger.log_figure(f"eval/figures/{step_id}_{name}.png", figure)
        for name, table in result.tables.items():
            logger.log_table(f"eval/tables/{step_id}_{name}.csv", table)
        self._finished(context, f"evaluate:{step_id}", False, started)
        return result.metrics

    # -- repeats ------------------------------------------------------------------------------

    def _repeats(self, context: RunContext, key: str, run: Any, result: RunResult) -> None:
        sampler = self.resolved.step("sampler")
        repeats = sampler.spec.repeats
        evaluator_steps = self.resolved.steps_of("evaluators")
        reference: dict[str, EvaluationResult] | None = None
        if any(getattr(s.component_class, "needs_reference", False) for s in evaluator_steps):
            child_context = self._child_context(
                context, run, "reference (all cells)", result, seed=context.seed, role="reference"
            )
            self._in_child(child_context, lambda c: self._pipeline(c, key, use_sampler=False))
            reference = child_context.extras.get("evaluations", {})
        per_repeat: list[dict[str, EvaluationResult]] = []
        all_metrics: list[dict[str, float]] = []
        for index in self._progress(list(range(repeats)), "repeats"):
            seed = context.seed + index
            child_context = self._child_context(
                context, run, f"repeat {index} (seed {seed})", result, seed=seed, role="repeat"
            )
            self._in_child(child_context, lambda c: self._pipeline(c, key))
            per_repeat.append(child_context.extras.get("evaluations", {}))
            all_metrics.append(child_context.metrics)
            if index == repeats - 1:
                result.interactions = dict(child_context.interactions)
        aggregates: dict[str, float] = {}
        for name in sorted(set().union(*all_metrics)) if all_metrics else []:
            values = np.array([m[name] for m in all_metrics if name in m], dtype=float)
            aggregates[f"{name}.mean"] = float(values.mean())
            aggregates[f"{name}.std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        for step in evaluator_steps:
            component = step.build()
            if hasattr(component, "aggregate"):
                repeat_results = [r[step.step_id] for r in per_repeat if step.step_id in r]
                reference_result = reference.get(step.step_id) if reference is not None else None
                for name, value in component.aggregate(repeat_results, reference_result).items():
                    aggregates[f"eval/{step.step_id}/{name}"] = float(value)
        context.logger.log_metrics(aggregates)
        result.metrics = aggregates

    def _child_context(
        self, parent: RunContext, run: Any, name: str, result: RunResult, seed: int, role: str
    ) -> RunContext:
        child_run = None
        if run is not None:
            child_run = self.tracker.start_run(
                self.recipe.tracking.experiment, f"{self.recipe.tracking.run_name or self.recipe.name}: {name}",
                {"grnx.recipe": self.recipe.name, "grnx.seed": str(seed), "grnx.child": role}, parent=run,
            )
            child_run.log_params({"seed": seed})
            result.child_run_ids.append(child_run.run_id)
        # Repeats run one after another and only add obs columns, so they share the parent's data
        # rather than copying the expression matrix once per repeat.
        return RunContext(
            seed=seed, roles=copy.copy(parent.roles), recipe=parent.recipe, adata=parent.adata,
            ground_truth=parent.ground_truth, logger=child_run if child_run is not None else NullLogger(),
            extras={"data_digest": parent.extras.get("data_digest")},
        )

    @staticmethod
    def _in_child(context: RunContext, body: Any) -> None:
        logger = context.logger
        try:
            body(context)
        except BaseException as error:
            if hasattr(logger, "end"):
                logger.set_tags({"grnx.error": f"{type(error).__name__}: {error}"})
                logger.end("FAILED")
            raise
        if hasattr(logger, "end"):
            logger.end("FINISHED")


class _SkipCache(Exception):
    """Raised inside ``Cache.store`` to drop an entry that could not be written."""


def run_recipe(
    resolved: ResolvedRecipe,
    *,
    tracking_uri: str | None = None,
    track: bool = True,
    cache: Cache | None = None,
    show_progress: bool = False,
) -> RunResult:
    """Run a resolved recipe, tracked in MLflow unless ``track`` is False."""
    from grnx_core.registry import default_registry

    tracker = None
    if track:
        from grnx_core.tracking import Tracker

        tracker = Tracker(tracking_uri)
    runner = Runner(
        resolved, tracker=tracker, cache=cache, plugin_manager=default_registry().plugin_manager,
        show_progress=show_progress,
    )
    return runner.run()


__all__ = ["Component", "Kind", "RunResult", "Runner", "run_recipe"]
