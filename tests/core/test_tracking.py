"""What a tracked run leaves in MLflow: params, tags, metrics, artifacts, and FAILED status."""

from __future__ import annotations

import os
import textwrap

import pytest
from mlflow.tracking import MlflowClient

from grnx_core.cache import Cache
from grnx_core.recipe import load_recipe
from grnx_core.runner import Runner
from grnx_core.tracking import Tracker

from .plugin_fixtures import fixture_registry

RECIPE = """
# tracking test
schema_version: 1
name: tracking
data: {name: scanpy_builtin, params: {dataset: krumsiek11}}
extractors: [{name: pearson}]
evaluators: [{name: top_pair_score, params: {fail: %s}}]
tracking: {experiment: tracking-tests, tags: {purpose: test}}
"""


@pytest.fixture
def registry():
    return fixture_registry()


def _run(tmp_path, registry, fail=False, overrides=()):
    path = tmp_path / "tracking.yaml"
    path.write_text(textwrap.dedent(RECIPE % ("true" if fail else "false")))
    resolved = load_recipe(path, list(overrides), registry=registry)
    tracker = Tracker(os.environ["MLFLOW_TRACKING_URI"])
    runner = Runner(
        resolved, tracker=tracker, cache=Cache(tmp_path / "cache"), plugin_manager=registry.plugin_manager
    )
    return resolved, tracker, runner


def test_finished_run_layout(tmp_path, registry):
    resolved, tracker, runner = _run(tmp_path, registry, overrides=["seed=3"])
    result = runner.run()
    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    # Params are named by their override path: what the recipe set and the defaults it got.
    params = run.data.params
    expected = {
        "name": "tracking",
        "schema_version": "1",
        "seed": "3",
        "data.name": "scanpy_builtin",
        "data.params.dataset": "krumsiek11",
        "data.label_key": "null",
        "preprocess": "[]",
        "sampler": "null",
        "model": "null",
        "extractors.0.name": "pearson",
        "extractors.0.params.rank_by": "abs",
        "extractors.0.params.top_k": "null",
        "evaluators.0.name": "top_pair_score",
        "evaluators.0.params.fail": "false",
        "tracking.experiment": "tracking-tests",
        "tracking.tags.purpose": "test",
        "train.epochs": "3",
        "train.learning_rate": "0.0001",
    }
    assert {key: params.get(key) for key in expected} == expected
    # Every section of the recipe is there, and each param given back as an override rebuilds the
    # same recipe ('' is left out: an empty override value reads as null).
    assert {key.split(".")[0] for key in params} == set(resolved.to_dict())
    overrides = [f"{key}={value}" for key, value in params.items() if value != ""]
    rebuilt = load_recipe(tmp_path / "tracking.yaml", overrides, registry=registry)
    assert rebuilt.to_dict() == resolved.to_dict()
    tags = run.data.tags
    assert tags["purpose"] == "test" and tags["grnx.recipe"] == "tracking"
    assert len(tags["grnx.data_digest"]) == 64
    assert tags["grnx.overrides"] == '["seed=3"]'
    assert tags["plugin.extractor.pearson"].startswith("grnx_plugins.extractors.pearson")
    assert run.data.metrics["data/n_cells"] == 640
    assert run.data.metrics["interactions/pearson/n_pairs"] == 55
    top = result.interactions["pearson"].table["score"].iloc[0]
    assert run.data.metrics["eval/top_pair_score/pearson/top_score"] == pytest.approx(top)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"recipe", "interactions"} <= artifacts
    assert {a.path for a in client.list_artifacts(result.run_id, "recipe")} == {
        "recipe/given.yaml",
        "recipe/resolved.yaml",
        "recipe/overrides.txt",
    }
    assert [a.path for a in client.list_artifacts(result.run_id, "interactions")] == [
        "interactions/pearson.parquet"
    ]
    local = client.download_artifacts(result.run_id, "recipe/given.yaml", str(tmp_path))
    assert "# tracking test" in open(local).read()
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location.endswith("artifacts/tracking-tests")


def test_failed_run_is_marked_failed_with_the_error(tmp_path, registry):
    _, tracker, runner = _run(tmp_path, registry, fail=True)
    with pytest.raises(RuntimeError):
        runner.run()
    client = MlflowClient(tracker.tracking_uri)
    runs = client.search_runs(
        [tracker.experiment_id("tracking-tests")],
        "attributes.status = 'FAILED'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    assert runs and runs[0].data.tags["grnx.error"] == "RuntimeError: injected failure"


def test_interrupted_run_is_marked_failed(tmp_path, registry, monkeypatch):
    _, tracker, runner = _run(tmp_path, registry)
    from grnx_plugins.extractors import pearson

    def interrupt(self, context):
        raise KeyboardInterrupt

    monkeypatch.setattr(pearson.PearsonExtractor, "extract", interrupt)
    with pytest.raises(KeyboardInterrupt):
        runner.run()
    client = MlflowClient(tracker.tracking_uri)
    run = client.search_runs(
        [tracker.experiment_id("tracking-tests")], order_by=["attributes.start_time DESC"], max_results=1
    )[0]
    assert run.info.status == "FAILED" and run.data.tags["grnx.error"] == "interrupted"


def test_long_param_values_are_kept_whole_in_an_artifact(tmp_path):
    tracker = Tracker(os.environ["MLFLOW_TRACKING_URI"])
    run = tracker.start_run("tracking-tests", "long-values")
    run.log_params({"long": "x" * 7000, "short": "y"})
    run.end()
    client = MlflowClient(tracker.tracking_uri)
    params = client.get_run(run.run_id).data.params
    assert params["short"] == "y" and params["long"].endswith("(full value in params/long_values.json)")
    local = client.download_artifacts(run.run_id, "params/long_values.json", str(tmp_path))
    import json

    assert json.load(open(local))["long"] == "x" * 7000
