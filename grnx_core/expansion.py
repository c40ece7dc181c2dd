"""Nested runs as recipe expansions: sweep points, repeats and the full-data reference.

One mechanism makes every child: a copy of the recipe data with a few paths set, validated like any
recipe. A ``sweep`` grid gives one group per point; within a group, a sampler with ``repeats: k``
gives k children whose only difference is ``sampler.seed`` (so stages that do not read the sample,
such as the model, have the same cache key and run once), and a full-data reference (``sampler:
null``) is added when ``sampler.reference`` is set or an evaluator ``needs_reference``. Children
run through the same executor, so the stages they share are computed once.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grnx_core.errors import Problem, RecipeError
from grnx_core.recipe import LoadedRecipe, Origins, ResolvedRecipe, apply_override, validate_recipe


@dataclass
class ChildRecipe:
    """One leaf recipe of a run: ``role`` is "single", "repeat" or "reference"."""

    name: str
    role: str
    resolved: ResolvedRecipe
    sampler_seed: int | None = None


@dataclass
class Group:
    """The children of one sweep point (the whole run without a sweep)."""

    label: str
    values: dict[str, Any]
    repeats: list[ChildRecipe] = field(default_factory=list)
    reference: ChildRecipe | None = None

    @property
    def children(self) -> list[ChildRecipe]:
        return ([self.reference] if self.reference is not None else []) + self.repeats


@dataclass
class Plan:
    groups: list[Group]

    @property
    def nested(self) -> bool:
        """Whether the run has child runs (False: one leaf, run in the top run itself)."""
        return len(self.groups) > 1 or any(g.reference is not None or len(g.repeats) > 1 for g in self.groups)

    @property
    def children(self) -> list[ChildRecipe]:
        return [child for group in self.groups for child in group.children]


def _metric_safe(text: str) -> str:
    """MLflow metric names allow letters, digits, ``_ - . /`` and spaces."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", text).strip("_") or "value"


def group_label(values: dict[str, Any]) -> str:
    """``{sampler.name: wds, sampler.params.fraction: 0.05}`` -> ``name_wds-fraction_0.05``."""
    return "-".join(
        f"{_metric_safe(path.split('.')[-1])}_{_metric_safe(str(value))}" for path, value in values.items()
    )


def _base_data(resolved: ResolvedRecipe) -> tuple[dict[str, Any], LoadedRecipe]:
    if resolved.source is not None:
        return copy.deepcopy(resolved.source.data), resolved.source
    data = resolved.to_dict()
    return data, LoadedRecipe(Path(f"<{resolved.recipe.name}>"), data, "", [], Origins())


def _child(
    loaded: LoadedRecipe, data: dict[str, Any], settings: dict[str, Any], registry: Any, where: str
) -> ResolvedRecipe:
    """Validate ``data`` with ``settings`` (recipe path -> value) applied."""
    data = copy.deepcopy(data)
    data.pop("sweep", None)
    origins = Origins(dict(loaded.origins.by_path), dict(loaded.origins.override_paths))
    overrides = list(loaded.overrides)
    for path, value in settings.items():
        try:
            apply_override(data, path.split("."), value)
        except ValueError as error:
            raise RecipeError(
                [Problem(where, f"cannot set {path}: {error}", source=loaded.origins.of(where))]
            ) from None
        text = f"{path}={value!r}"
        origins.override_paths[path] = f"{where}: {text}"
        overrides.append(text)
    child = LoadedRecipe(loaded.path, data, loaded.given_text, overrides, origins)
    return validate_recipe(child, registry)


def _needs_reference(resolved: ResolvedRecipe) -> bool:
    sampler = resolved.recipe.sampler
    if sampler is None:
        return False
    return sampler.reference or any(
        getattr(step.component_class, "needs_reference", False) for step in resolved.steps_of("evaluators")
    )


def _reference_without_sampler(resolved: ResolvedRecipe) -> list[Problem]:
    """An evaluator that compares repeats with the full-data run, in a recipe with no sampler.

    Checked here, where a recipe (or sweep point) becomes its children, and not in
    ``validate_recipe``: the reference child is the same recipe with ``sampler: null`` and is
    validated too, but it never comes back through ``_group``, so only recipes that have no sampler
    of their own are refused.
    """
    origins = resolved.source.origins if resolved.source is not None else None
    return [
        Problem(
            step.path,
            f"evaluator {step.spec.name!r} compares repeated samples with the full-data run, but the "
            "recipe has no sampler, so there is nothing to compare",
            source=origins.of(step.path) if origins is not None else "",
            hint="Add a sampler with repeats (e.g. sampler: {name: uniform, params: {fraction: 0.1}, "
            "repeats: 5}), or score the single run with the evaluator it extends (e.g. 'nes').",
        )
        for step in resolved.steps_of("evaluators")
        if getattr(step.component_class, "needs_reference", False)
    ]


def _group(label: str, values: dict[str, Any], resolved: ResolvedRecipe, registry: Any) -> Group:
    group = Group(label, values)
    sampler = resolved.recipe.sampler
    prefix = f"{label}: " if label else ""
    if sampler is None and (problems := _reference_without_sampler(resolved)):
        raise RecipeError(problems)
    if sampler is None or (sampler.repeats == 1 and not _needs_reference(resolved)):
        group.repeats.append(ChildRecipe(prefix.rstrip(": ") or "run", "single", resolved, None))
        return group
    data, loaded = _base_data(resolved)
    base_seed = sampler.seed if sampler.seed is not None else resolved.recipe.seed
    for index in range(sampler.repeats):
        seed = base_seed + index
        child = _child(
            loaded,
            data,
            {"sampler.seed": seed, "sampler.repeats": 1, "sampler.reference": False},
            registry,
            "sampler.repeats",
        )
        group.repeats.append(ChildRecipe(f"{prefix}repeat {index} (seed {seed})", "repeat", child, seed))
    if _needs_reference(resolved):
        settings: dict[str, Any] = {"sampler": None}
        for section in ("extractors", "evaluators"):  # on all cells, "the sample" is every cell
            for index, item in enumerate(data.get(section) or []):
                if isinstance(item, dict) and item.get("cells") == "sample":
                    settings[f"{section}.{index}.cells"] = "all"
        if isinstance(data.get("model"), dict) and data["model"].get("cells") == "sample":
            settings["model.cells"] = "train"
        reference = _child(loaded, data, settings, registry, "sampler.reference")
        group.reference = ChildRecipe(f"{prefix}reference (all cells)", "reference", reference, None)
    return group


def expand(resolved: ResolvedRecipe, registry: Any) -> Plan:
    """The children of a resolved recipe; every child is validated before anything runs."""
    sweep = resolved.recipe.sweep
    if sweep is None:
        return Plan([_group("", {}, resolved, registry)])
    data, loaded = _base_data(resolved)
    paths = list(sweep.grid)
    groups = []
    problems: list[Problem] = []
    points = [dict(zip(paths, point)) for point in itertools.product(*(sweep.grid[path] for path in paths))]
    labels = [group_label(values) for values in points]
    if len(set(labels)) < len(labels):  # swept paths that end in the same name: label by the whole path
        labels = [
            "-".join(f"{_metric_safe(p)}_{_metric_safe(str(v))}" for p, v in values.items())
            for values in points
        ]
    for values, label in zip(points, labels):
        try:
            point_recipe = _child(loaded, data, values, registry, "sweep.grid")
            groups.append(_group(label, values, point_recipe, registry))
        except RecipeError as error:
            for problem in error.problems:
                problems.append(
                    Problem(
                        problem.path,
                        f"{problem.message} (sweep point {values})",
                        problem.source,
                        problem.hint,
                    )
                )
    if sweep.plot is not None:
        if sweep.plot.x not in sweep.grid:
            problems.append(
                Problem(
                    "sweep.plot.x",
                    f"{sweep.plot.x!r} is not a swept path; swept: {', '.join(paths)}",
                    source=loaded.origins.of("sweep.plot.x"),
                )
            )
    if problems:
        raise RecipeError(problems)
    return Plan(groups)
