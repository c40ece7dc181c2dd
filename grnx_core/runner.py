"""The runner: opens the tracked runs of a recipe, runs its children through the executor, aggregates.

A recipe expands (``grnx_core.expansion``) into leaf recipes: one, or the repeats, full-data
reference and sweep points of a nested run. Each leaf runs through one shared
``grnx_core.engine.Executor`` (so the stages leaves share are computed once) and, when nested,
in its own MLflow child run under the parent, which holds per-group aggregates (mean, std, n of
every metric, each evaluator's ``aggregate``) and, for a sweep with ``plot``, a figure of one
metric against one swept value. A runner can start under an existing parent run (tuning trials).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from grnx_core import __version__, progress
from grnx_core.cache import Cache
from grnx_core.components import Component, Kind
from grnx_core.context import NullLogger, RunContext, RunLogger
from grnx_core.data_types import EvaluationResult, Interactions
from grnx_core.engine import Executor, LeafResult, SampleValue
from grnx_core.errors import GrnxError
from grnx_core.expansion import ChildRecipe, Group, Plan, expand
from grnx_core.recipe import Recipe, ResolvedRecipe, flatten

log = logging.getLogger("grnx")


@dataclass
class ChildResult:
    """One child run: its recipe, run id and what its leaf produced."""

    child: ChildRecipe
    run_id: str | None
    leaf: LeafResult

    @property
    def sample(self) -> SampleValue | None:
        return self.leaf.sample


@dataclass
class RunResult:
    """What a run produced; ``metrics`` are the top run's metrics (aggregates when nested)."""

    run_id: str | None
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    interactions: dict[str, Interactions] = field(default_factory=dict)
    cached_stages: list[str] = field(default_factory=list)
    child_run_ids: list[str] = field(default_factory=list)
    children: list[ChildResult] = field(default_factory=list)
    stages: list[Any] = field(default_factory=list)
    leaf: LeafResult | None = None
    artifact_uri: str | None = None

    @property
    def context(self) -> RunContext | None:
        """Every value of the (last) leaf, the data included: for the Python API and tests."""
        return self.leaf.context if self.leaf is not None else None


def describe_run(recipe: Recipe, overrides: list[str]) -> str:
    """``wds_pearson · wds 5% · seed 1 · extractors.0.params.top_k=100``: name, sampler, seed, overrides."""
    swept = set(recipe.sweep.grid) if recipe.sweep is not None else set()
    parts = [recipe.name]
    sampler = recipe.sampler
    if sampler is not None and not any(path.startswith("sampler") for path in swept):
        size = sampler.params.get("fraction")
        if isinstance(size, (int, float)) and not isinstance(size, bool):
            parts.append(f"{sampler.name} {size * 100:g}%")
        elif sampler.params.get("n_cells") is not None:
            parts.append(f"{sampler.name} {sampler.params['n_cells']} cells")
        else:
            parts.append(sampler.name)
        if sampler.repeats > 1:
            parts.append(f"{sampler.repeats} repeats")
    if "seed" not in swept:
        parts.append(f"seed {recipe.seed}")
    described = (
        "seed",
        "sampler.name",
        "sampler.params.fraction",
        "sampler.params.n_cells",
        "sampler.repeats",
    )
    parts.extend(override for override in overrides if override.split("=", 1)[0].strip() not in described)
    return " · ".join(parts)


def _log_recipe(run: Any, resolved: ResolvedRecipe) -> None:
    run.log_params(flatten(resolved.to_dict()))
    run.log_text(resolved.to_yaml(), "recipe/resolved.yaml")
    if resolved.source is not None:
        run.log_text(resolved.source.given_text, "recipe/given.yaml")
        run.log_text("\n".join(resolved.source.overrides) + "\n", "recipe/overrides.txt")
    versions = {}
    for step in resolved.steps:
        versions[f"plugin.{step.kind.value}.{step.spec.name}"] = (
            f"{step.component_class.__module__} v{step.component_class.version()}"
        )
    from grnx_core.registry import default_registry

    for plugin, version in default_registry().plugin_versions.items():
        versions[f"plugin_dist.{plugin}"] = version
    run.set_tags(versions)


class Runner:
    """Runs one resolved recipe. ``tracker`` None runs without MLflow (tests, the Python API)."""

    def __init__(
        self,
        resolved: ResolvedRecipe,
        *,
        tracker: Any = None,
        cache: Cache | None = None,
        plugin_manager: Any = None,
        show_progress: bool = False,
        parent_run: Any = None,
        registry: Any = None,
    ) -> None:
        self.resolved = resolved
        self.recipe = resolved.recipe
        self.tracker = tracker
        self.cache = cache if cache is not None else Cache(enabled=resolved.recipe.cache)
        self.plugin_manager = plugin_manager
        self.show_progress = show_progress
        self.parent_run = parent_run
        self.registry = registry
        self.executor = Executor(self.cache, plugin_manager, self._say if show_progress else None)

    def _say(self, message: str) -> None:
        progress.say(f"[grnx] {message}")

    def _hook(self, name: str, **kwargs: Any) -> None:
        self.executor.hook(name, **kwargs)

    def _tags(self) -> dict[str, str]:
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
        return tags

    def _registry(self) -> Any:
        if self.registry is not None:
            return self.registry
        if self.resolved.registry is not None:
            return self.resolved.registry
        from grnx_core.registry import default_registry

        return default_registry()

    def run_name(self) -> str:
        """The recipe's ``tracking.run_name``, else its name and what tells its runs apart.

        Runs of one recipe differ by sampler, seed and overrides; naming them all after the
        recipe makes WDS and uniform runs of one experiment look alike in the MLflow UI.
        """
        recipe = self.recipe
        if recipe.tracking.run_name:
            return recipe.tracking.run_name
        return describe_run(recipe, self.resolved.source.overrides if self.resolved.source else [])

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> RunResult:
        if not self.show_progress:
            return self._run()
        previous = progress.set_enabled(True)
        try:
            return self._run()
        finally:
            progress.set_enabled(previous)

    def _run(self) -> RunResult:
        recipe = self.recipe
        plan = expand(self.resolved, self._registry())
        run = None
        if self.tracker is not None:
            run = self.tracker.start_run(
                recipe.tracking.experiment,
                self.run_name(),
                self._tags(),
                parent=self.parent_run,
            )
            # A run left RUNNING by a process killed outright (SIGKILL, power loss) is marked FAILED.
            self.tracker.fail_orphaned_runs(found_by=run.run_id)
        logger: RunLogger = run if run is not None else NullLogger()
        context = RunContext(
            seed=recipe.seed,
            train_settings=recipe.train,
            execution=recipe.execution,
            logger=logger,
            extras={"recipe_name": recipe.name},
        )
        result = RunResult(run_id=run.run_id if run else None, status="RUNNING")
        try:
            self._hook("grnx_run_started", context=context, run_id=result.run_id)
            if run is not None:
                _log_recipe(run, self.resolved)
            if plan.nested:
                self._nested(plan, run, logger, result)
            else:
                leaf = self.executor.run(plan.groups[0].repeats[0].resolved, logger)
                result.leaf, result.metrics = leaf, dict(leaf.metrics)
                result.interactions, result.stages = dict(leaf.interactions), list(leaf.stages)
            result.cached_stages = [s.stage for s in result.stages if s.cached]
            result.status = "FINISHED"
            if run is not None:
                run.set_tags({"grnx.cached_stages": ",".join(dict.fromkeys(result.cached_stages)) or "none"})
                result.artifact_uri = getattr(run, "artifact_uri", None)
                run.end("FINISHED")
        except BaseException as error:
            result.status = "FAILED"
            if run is not None:
                reason = (
                    "interrupted"
                    if isinstance(error, KeyboardInterrupt)
                    else f"{type(error).__name__}: {error}"
                )
                run.set_tags({"grnx.error": reason, "grnx.error_type": type(error).__name__})
                run.end("FAILED")
            context.metrics = result.metrics
            self._hook("grnx_run_finished", context=context, status="FAILED", error=error)
            raise
        context.metrics = result.metrics
        self._hook("grnx_run_finished", context=context, status="FINISHED", error=None)
        return result

    # -- nested runs --------------------------------------------------------------------------

    def _nested(self, plan: Plan, run: Any, logger: RunLogger, result: RunResult) -> None:
        aggregates: dict[str, float] = {}
        rows = []
        labelled = any(group.label for group in plan.groups)
        # Sweep points that differ only in the sampler share one full-data reference run.
        references: dict[str, ChildResult] = {}
        for group in plan.groups:
            outcomes = []
            for child in group.children:
                identity = (
                    json.dumps(child.resolved.to_dict(), sort_keys=True) if child.role == "reference" else ""
                )
                if identity and identity in references:
                    outcomes.append(references[identity])
                    continue
                outcome = self._child(child, run, result)
                if identity:
                    references[identity] = outcome
                outcomes.append(outcome)
            repeats = [o for o in outcomes if o.child.role != "reference"]
            reference = next((o for o in outcomes if o.child.role == "reference"), None)
            group_metrics = self._aggregate(group, repeats, reference)
            prefix = f"sweep/{group.label}/" if labelled else ""
            aggregates.update({f"{prefix}{name}": value for name, value in group_metrics.items()})
            rows.append(
                {**{f"value:{k}": v for k, v in group.values.items()}, "group": group.label, **group_metrics}
            )
            if repeats:
                result.interactions = dict(repeats[-1].leaf.interactions)
                result.leaf = repeats[-1].leaf
        logger.log_metrics(aggregates)
        result.metrics = aggregates
        if labelled:
            logger.log_table("sweep/groups.csv", pd.DataFrame(rows))
            sweep = self.recipe.sweep
            if sweep is not None and sweep.plot is not None:
                figure = sweep_figure(plan, rows, sweep.plot.metric, sweep.plot.x)
                if figure is not None:
                    logger.log_figure(
                        f"sweep/{_file_safe(sweep.plot.metric)}_vs_{_file_safe(sweep.plot.x)}.png", figure
                    )

    def _child(self, child: ChildRecipe, run: Any, result: RunResult) -> ChildResult:
        child_run = None
        if run is not None:
            recipe = self.recipe
            tags = {"grnx.recipe": recipe.name, "grnx.child": child.role, "grnx.version": __version__}
            if child.sampler_seed is not None:
                tags["grnx.seed"] = str(child.sampler_seed)
            child_run = self.tracker.start_run(
                recipe.tracking.experiment,
                f"{self.run_name()}: {child.name}",
                tags,
                parent=run,
            )
            child_run.log_params(flatten(child.resolved.to_dict()))
            result.child_run_ids.append(child_run.run_id)
        logger: RunLogger = child_run if child_run is not None else NullLogger()
        if self.show_progress:
            self._say(f"child run {len(result.children) + 1}: {child.name}")
        try:
            leaf = self.executor.run(child.resolved, logger)
        except BaseException as error:
            if child_run is not None:
                child_run.set_tags({"grnx.error": f"{type(error).__name__}: {error}"})
                child_run.end("FAILED")
            raise
        if child_run is not None:
            child_run.set_tags({"grnx.cached_stages": ",".join(leaf.cached_stages) or "none"})
            child_run.end("FINISHED")
        result.stages.extend(leaf.stages)
        outcome = ChildResult(child, child_run.run_id if child_run is not None else None, leaf)
        result.children.append(outcome)
        return outcome

    def _aggregate(
        self, group: Group, repeats: list[ChildResult], reference: ChildResult | None
    ) -> dict[str, float]:
        """Mean, std (ddof 1) and n of every repeat metric, and each evaluator's own aggregate."""
        out: dict[str, float] = {}
        all_metrics = [o.leaf.metrics for o in repeats]
        for name in sorted(set().union(*all_metrics)) if all_metrics else []:
            values = np.array([m[name] for m in all_metrics if name in m], dtype=float)
            out[f"{name}.mean"] = float(values.mean())
            out[f"{name}.std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            out[f"{name}.n"] = float(len(values))
        if reference is not None:
            for name, value in reference.leaf.metrics.items():
                out[f"{name}.reference"] = float(value)
        resolved = (group.repeats[0] if group.repeats else group.reference).resolved  # type: ignore[union-attr]
        for step in resolved.steps_of("evaluators"):
            component: Component = step.build()
            if not hasattr(component, "aggregate"):
                continue
            results: list[EvaluationResult] = [
                o.leaf.evaluations[step.step_id] for o in repeats if step.step_id in o.leaf.evaluations
            ]
            reference_result = reference.leaf.evaluations.get(step.step_id) if reference is not None else None
            for name, value in component.aggregate(results, reference_result).items():
                out[f"eval/{step.step_id}/{name}"] = float(value)
        return out


def _file_safe(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def sweep_figure(plan: Plan, rows: list[dict[str, Any]], metric: str, x: str) -> Any:
    """``metric`` (mean over repeats, std as error bars) against the swept ``x``, a line per group
    of the other swept values. None when no group has the metric."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    table = pd.DataFrame(rows)
    mean, std = f"{metric}.mean", f"{metric}.std"
    if mean not in table.columns:
        log.warning("sweep plot: no group logged %s; no figure", metric)
        return None
    others = [c for c in table.columns if c.startswith("value:") and c != f"value:{x}"]
    figure, axes = plt.subplots(figsize=(6, 4))
    groups = table.groupby(others, sort=False) if others else [((), table)]
    for key, frame in groups:
        frame = frame.sort_values(f"value:{x}")
        label = ", ".join(
            f"{c[6:].split('.')[-1]}={v}" for c, v in zip(others, key if isinstance(key, tuple) else (key,))
        )
        axes.errorbar(
            frame[f"value:{x}"].astype(float)
            if _numeric(frame[f"value:{x}"])
            else frame[f"value:{x}"].astype(str),
            frame[mean],
            yerr=frame[std] if std in frame else None,
            marker="o",
            capsize=3,
            label=label or None,
        )
    reference = f"{metric}.reference"
    if reference in table.columns and table[reference].notna().any():
        # The full-data run: the value the samples should reproduce.
        for value in table[reference].dropna().unique():
            axes.axhline(float(value), color="grey", linestyle="--", linewidth=1)
        axes.plot([], [], color="grey", linestyle="--", linewidth=1, label="all cells (reference)")
    axes.set_xlabel(x)
    axes.set_ylabel(f"{metric} (mean ± std over repeats)")
    if others or reference in table.columns:
        axes.legend()
    axes.grid(alpha=0.3)
    return figure


def _numeric(values: pd.Series) -> bool:
    try:
        values.astype(float)
    except (TypeError, ValueError):
        return False
    return True


def run_recipe(
    resolved: ResolvedRecipe,
    *,
    tracking_uri: str | None = None,
    track: bool = True,
    cache: Cache | None = None,
    show_progress: bool = False,
    parent_run: Any = None,
) -> RunResult:
    """Run a resolved recipe, tracked in MLflow unless ``track`` is False.

    A recipe with a ``tune`` block is a search, not one run: ``grnx_core.tuning.run_tune`` runs it.
    """
    from grnx_core.registry import default_registry

    if resolved.recipe.tune is not None:
        raise GrnxError(
            f"recipe {resolved.recipe.name!r} has a tune block, which run_recipe would ignore: run it with "
            "grnx_core.tuning.run_tune(resolved, ...) or `grnx run`, or drop the block to run it once."
        )

    tracker = None
    if track:
        from grnx_core.tracking import Tracker

        tracker = Tracker(tracking_uri)
    runner = Runner(
        resolved,
        tracker=tracker,
        cache=cache,
        plugin_manager=default_registry().plugin_manager,
        show_progress=show_progress,
        parent_run=parent_run,
    )
    return runner.run()


__all__ = ["Component", "Kind", "RunResult", "Runner", "run_recipe"]
