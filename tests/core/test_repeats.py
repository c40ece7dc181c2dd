"""Repeated samplers run as nested MLflow runs under a parent that holds the aggregates."""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from grnx_core.cache import Cache
from grnx_core.recipe import load_recipe
from grnx_core.runner import Runner
from grnx_core.tracking import Tracker

from .plugin_fixtures import fixture_registry

RECIPE = """
schema_version: 1
name: repeats
seed: 10
data: {name: scanpy_builtin, params: {dataset: krumsiek11}}
sampler: {name: stride, params: {step: 5}, repeats: 3}
extractors: [{name: pearson}]
evaluators: [{name: top_score_stability}]
tracking: {experiment: repeat-tests}
"""


def test_repeats_are_nested_runs_with_aggregates(tmp_path):
    registry = fixture_registry()
    path = tmp_path / "repeats.yaml"
    path.write_text(textwrap.dedent(RECIPE))
    tracker = Tracker(os.environ["MLFLOW_TRACKING_URI"])
    result = Runner(
        load_recipe(path, registry=registry),
        tracker=tracker,
        cache=Cache(tmp_path / "cache"),
        plugin_manager=registry.plugin_manager,
    ).run()
    client = MlflowClient(tracker.tracking_uri)
    children = client.search_runs(
        [tracker.experiment_id("repeat-tests")], f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    assert len(children) == 4 == len(result.child_run_ids)  # the all-cells reference and 3 repeats
    by_seed = {run.data.tags["grnx.seed"]: run for run in children if run.data.tags["grnx.child"] == "repeat"}
    assert sorted(by_seed) == ["10", "11", "12"]
    reference = next(run for run in children if run.data.tags["grnx.child"] == "reference")
    assert "sample/n_cells" not in reference.data.metrics
    assert all(run.data.metrics["sample/n_cells"] == 128 for run in by_seed.values())
    key = "eval/top_score_stability/pearson/top_score"
    values = np.array([by_seed[s].data.metrics[key] for s in ("10", "11", "12")])
    parent = client.get_run(result.run_id).data.metrics
    assert parent[f"{key}.mean"] == pytest.approx(values.mean())
    assert parent[f"{key}.std"] == pytest.approx(values.std(ddof=1))
    expected_mse = np.mean((values - reference.data.metrics[key]) ** 2)
    assert parent["eval/top_score_stability/mse_vs_reference"] == pytest.approx(expected_mse)
    offsets = {by_seed[s].data.metrics["sample/offset"] for s in by_seed}
    assert len(offsets) > 1, "different seeds must draw different samples"
