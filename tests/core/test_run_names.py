"""Runs are named by what tells them apart: sampler, size, seed, overrides, sweep point, repeat."""

from __future__ import annotations

import os
import textwrap

from mlflow.tracking import MlflowClient

from grnx_core.cache import Cache
from grnx_core.recipe import load_recipe
from grnx_core.runner import Runner
from grnx_core.tracking import Tracker

from .plugin_fixtures import fixture_registry

RECIPE = """
schema_version: 1
name: naming
data: {name: scanpy_builtin, params: {dataset: krumsiek11}}
sampler: {name: uniform, params: {fraction: 0.5}, repeats: 2}
extractors: [{name: pearson}]
tracking: {experiment: naming-tests}
"""


def _names(tmp_path, recipe_text, overrides=()):
    path = tmp_path / "naming.yaml"
    path.write_text(textwrap.dedent(recipe_text))
    registry = fixture_registry()
    resolved = load_recipe(path, list(overrides), registry=registry)
    tracker = Tracker(os.environ["MLFLOW_TRACKING_URI"])
    result = Runner(
        resolved, tracker=tracker, cache=Cache(tmp_path / "cache"), plugin_manager=registry.plugin_manager
    ).run()
    client = MlflowClient(tracker.tracking_uri)
    parent = client.get_run(result.run_id).info.run_name
    children = sorted(client.get_run(run_id).info.run_name for run_id in result.child_run_ids)
    return parent, children


def test_runs_of_one_recipe_with_different_settings_have_different_names(tmp_path):
    parent, children = _names(tmp_path, RECIPE, ["seed=4", "extractors.0.params.top_k=10"])
    assert parent == "naming · uniform 50% · 2 repeats · seed 4 · extractors.0.params.top_k=10"
    assert children == [f"{parent}: repeat 0 (seed 4)", f"{parent}: repeat 1 (seed 5)"]
    other, _ = _names(tmp_path, RECIPE, ["sampler.params.fraction=0.25"])
    assert other == "naming · uniform 25% · 2 repeats · seed 0"


def test_sweep_children_carry_their_point_and_the_parent_does_not_claim_one_sampler(tmp_path):
    sweep = RECIPE.replace("repeats: 2", "repeats: 1") + textwrap.dedent(
        """
        sweep:
          grid:
            sampler.params.fraction: [0.25, 0.5]
        """
    )
    parent, children = _names(tmp_path, sweep)
    assert parent == "naming · seed 0"
    assert children == [f"{parent}: fraction_0.25", f"{parent}: fraction_0.5"]


def test_an_explicit_run_name_wins(tmp_path):
    parent, _ = _names(
        tmp_path, RECIPE.replace("{experiment: naming-tests}", "{experiment: naming-tests, run_name: mine}")
    )
    assert parent == "mine"
