"""Tuning: the tune block's checks, trial recipes, the trial record and its replay, and (slow, with
Ray) whole tunes: trials as nested runs, ASHA stopping a diverging trial, a held-out ground truth,
and resuming an interrupted tune under the same parent run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from grnx_core.errors import RecipeError
from grnx_core.recipe import load_recipe
from grnx_core.tuning import RecordingTracker, TrialJob, replay_record, search_space, tune_id

MLP_TUNE = {
    "schema_version": 1,
    "name": "mlp_tune_test",
    "seed": 0,
    "data": {"name": "scanpy_builtin", "params": {"dataset": "pbmc68k_reduced"}, "label_key": "bulk_labels"},
    "model": {"name": "mlp", "params": {"hidden_sizes": [16], "dropout": 0.0}},
    "train": {
        "epochs": 2,
        "batch_size": 64,
        "learning_rate": 0.001,
        "optimizer": "adam",
        "validation_fraction": 0.2,
        "device": "cpu",
    },
    "evaluators": [{"name": "classification", "params": {}}],
    "tracking": {"experiment": "tune_test"},
    "tune": {
        "metric": "eval/classification/macro_f1",
        "mode": "max",
        "num_samples": 4,
        "n_initial_points": 2,
        "max_concurrent": 2,
        "space": {
            "train.learning_rate": {"type": "loguniform", "low": 0.0001, "high": 0.01},
            "model.params.hidden_sizes": {"type": "choice", "values": [[8], [16]]},
            "train.batch_size": {"type": "randint", "low": 32, "high": 64},
        },
    },
}

PEARSON_TUNE = {
    "schema_version": 1,
    "name": "pearson_tune_test",
    "seed": 0,
    "data": {
        "name": "synthetic",
        "params": {
            "n_cells": 300,
            "n_genes": 30,
            "n_regulators": 6,
            "n_rewired": 2,
            "n_gained": 2,
            "seed": 0,
        },
        "label_key": "disease",
    },
    "preprocess": [
        {"name": "normalize_total", "params": {"target_sum": 10000}},
        {"name": "log1p", "params": {}},
    ],
    "extractors": [{"name": "pearson", "params": {"rank_by": "abs"}}],
    "evaluators": [{"name": "auprc", "params": {"ground_truth": {"source": "data"}}}],
    "tracking": {"experiment": "tune_pearson_test"},
    "tune": {
        "metric": "eval/auprc/pearson/truth_genes/epr",
        "mode": "max",
        "num_samples": 3,
        "n_initial_points": 1,
        "max_concurrent": 1,
        "ground_truth_split": {"fraction": 0.5, "seed": 0},
        "space": {
            "extractors.0.params.rank_by": {"type": "choice", "values": ["abs", "value"]},
            "preprocess.0.params.target_sum": {"type": "loguniform", "low": 100.0, "high": 100000.0},
        },
    },
}


def _write(tmp_path: Path, data: dict, name: str = "tune.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _with_tune(base: dict, **changes) -> dict:
    data = json.loads(json.dumps(base))
    data["tune"].update(changes)
    return data


# -- the tune block ---------------------------------------------------------------------------


def test_tune_block_validates_and_keeps_its_space(tmp_path):
    resolved = load_recipe(_write(tmp_path, MLP_TUNE))
    spec = resolved.recipe.tune
    assert spec is not None and spec.initial_points == 2 and spec.scheduler.type == "none"
    assert set(spec.space) == {"train.learning_rate", "model.params.hidden_sizes", "train.batch_size"}


@pytest.mark.parametrize(
    ("changes", "path", "words"),
    [
        ({"n_initial_points": 4}, "tune", "never searches"),
        ({"metric": "eval/nes/x"}, "tune.metric", "does not have"),
        (
            {"space": {"train.learning_rate": {"type": "loguniform", "low": 0.0, "high": 0.1}}},
            "tune.space",
            "low > 0",
        ),
        (
            {"space": {"train.learning_rate": {"type": "uniform", "low": 0.1, "high": 0.01}}},
            "tune.space",
            "below",
        ),
        ({"space": {"train.scheduler": {"type": "choice", "values": []}}}, "tune.space", "non-empty"),
        # a bound outside what the recipe accepts is found before anything runs
        (
            {"space": {"train.validation_fraction": {"type": "uniform", "low": 0.1, "high": 1.5}}},
            "train.validation_fraction",
            "tune point",
        ),
        (
            {"space": {"train.optimizer": {"type": "choice", "values": ["adamw", "sgd"]}}},
            "train.optimizer",
            "sgd",
        ),
        ({"space": {"model.params.no_such": {"type": "choice", "values": [1]}}}, "model.params", "no_such"),
        (
            {"scheduler": "asha", "ground_truth_split": {"fraction": 0.5}},
            "tune.ground_truth_split",
            "no evaluator",
        ),
    ],
)
def test_bad_tune_blocks_are_refused_saying_where(tmp_path, changes, path, words):
    with pytest.raises(RecipeError) as caught:
        load_recipe(_write(tmp_path, _with_tune(MLP_TUNE, **changes)))
    assert any(p.path.startswith(path) and words in p.message for p in caught.value.problems), str(
        caught.value
    )


def test_asha_needs_a_model(tmp_path):
    with pytest.raises(RecipeError, match="ASHA"):
        load_recipe(_write(tmp_path, _with_tune(PEARSON_TUNE, scheduler={"type": "asha"})))


def test_trial_recipe_sets_the_sampled_paths_and_the_tune_part_of_the_ground_truth(tmp_path):
    resolved = load_recipe(_write(tmp_path, PEARSON_TUNE))
    job = TrialJob.of(resolved)
    settings = job.settings({"extractors.0.params.rank_by": "value", "preprocess.0.params.target_sum": 512.0})
    trial = job.recipe(settings)
    assert trial.recipe.tune is None
    assert trial.steps_of("extractors")[0].params.rank_by == "value"
    assert trial.steps_of("preprocess")[0].params.target_sum == 512.0
    split = trial.steps_of("evaluators")[0].params.ground_truth.edge_split
    assert (split.part, split.fraction, split.seed) == ("tune", 0.5, 0)
    report = job.recipe(settings, part="report").steps_of("evaluators")[0].params.ground_truth.edge_split
    assert report.part == "report"


def test_randint_includes_high_and_integers_come_back_as_ints(tmp_path):
    from ray.tune.search.sample import Integer

    resolved = load_recipe(_write(tmp_path, MLP_TUNE))
    domain = search_space(resolved.recipe.tune)["train.batch_size"]
    assert isinstance(domain, Integer) and (domain.lower, domain.upper) == (32, 65)  # Ray's upper is excluded
    job = TrialJob.of(resolved)
    settings = job.settings(
        {"train.learning_rate": 0.001, "model.params.hidden_sizes": (8,), "train.batch_size": 40.0}
    )
    assert settings["train.batch_size"] == 40 and isinstance(settings["train.batch_size"], int)
    assert settings["model.params.hidden_sizes"] == [8]  # Ray's choice hands lists back as tuples


def test_tune_id_ignores_where_the_tune_runs(tmp_path):
    path = _write(tmp_path, MLP_TUNE)
    plain = tune_id(load_recipe(path))
    assert tune_id(load_recipe(path, ["execution.ray_address=127.0.0.1:6379"])) == plain
    assert tune_id(load_recipe(path, ["tune.num_samples=5"])) != plain


# -- the record a worker keeps and the driver replays -----------------------------------------


def test_a_trials_record_replays_into_nested_runs(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from grnx_core.tracking import Tracker

    steps = []
    recorder = RecordingTracker(
        tmp_path / "record", on_step=lambda run, metrics, step: steps.append((run, step))
    )
    (tmp_path / "record").mkdir()
    trial = recorder.start_run("x", "trial", {"grnx.child": "single"})
    trial.log_params({"train.learning_rate": 0.001, "model.params.hidden_sizes": [8]})
    for epoch in (1, 2):
        trial.log_metrics({"train/val_loss": 1.0 / epoch}, step=epoch)
    trial.log_metrics({"eval/classification/macro_f1": 0.75})
    trial.log_text("hello", "recipe/resolved.yaml")
    figure, _ = plt.subplots()
    trial.log_figure("eval/figures/curve.png", figure)
    repeat = recorder.start_run("x", "trial: repeat 0", {"grnx.child": "repeat"}, parent=trial)
    repeat.log_metrics({"eval/auprc/pearson/truth_genes/epr": 2.5})
    repeat.end("FINISHED")
    trial.end("FINISHED")
    recorder.save()
    assert steps == [("r0", 1), ("r0", 2)]

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracker.start_run("replay", "parent")
    run = tracker.start_run("replay", "trial 1", parent=parent)
    run.log_metrics({"train/val_loss": 1.0}, step=1)  # the driver logs epochs as they arrive
    run.log_metrics({"train/val_loss": 0.5}, step=2)
    assert replay_record(tmp_path / "record", tracker, run) == "FINISHED"
    run.end("FINISHED")

    client = tracker.client
    logged = client.get_run(run.run_id)
    assert logged.data.params["train.learning_rate"] == "0.001"
    assert logged.data.metrics["eval/classification/macro_f1"] == 0.75
    history = client.get_metric_history(run.run_id, "train/val_loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5)]  # not logged twice
    artifacts = {a.path for a in client.list_artifacts(run.run_id, "eval/figures")}
    assert artifacts == {"eval/figures/curve.png"}
    children = client.search_runs(
        [logged.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.run_id}'"
    )
    assert [c.data.metrics["eval/auprc/pearson/truth_genes/epr"] for c in children] == [2.5]
    assert children[0].data.tags["grnx.child"] == "repeat" and children[0].info.status == "FINISHED"


# -- whole tunes, with Ray (slow: Ray and a worker per trial start in tens of seconds here) --------


def _children(tracker, run_id, kind):
    experiment = tracker.experiment_id_of_run(run_id)
    return tracker.client.search_runs(
        [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`grnx.child` = '{kind}'"
    )


@pytest.mark.slow
def test_a_four_trial_tune_logs_four_nested_runs_inside_its_space_and_the_best_on_the_parent(
    tmp_path, local_ray
):
    from grnx_core.tracking import Tracker
    from grnx_core.tuning import run_tune

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_tune(load_recipe(_write(tmp_path, MLP_TUNE)), tracking_uri=uri)
    assert result.status == "FINISHED" and len(result.trials) == 4
    tracker = Tracker(uri)
    trials = _children(tracker, result.run_id, "trial")
    assert len(trials) == 4 and {t.info.status for t in trials} == {"FINISHED"}
    for trial in trials:
        params = trial.data.params
        assert 0.0001 <= float(params["train.learning_rate"]) <= 0.01
        assert params["model.params.hidden_sizes.0"] in ("8", "16")  # lists are flattened by index
        assert 32 <= int(params["train.batch_size"]) <= 64
        # the training loop's epochs reached the nested run, step by step
        history = tracker.client.get_metric_history(trial.info.run_id, "train/val_loss")
        assert sorted(m.step for m in history) == [1, 2]
    values = {t.info.run_id: t.data.metrics["eval/classification/macro_f1"] for t in trials}
    best_run = max(values, key=values.get)
    parent = tracker.client.get_run(result.run_id)
    assert parent.data.tags["grnx.tune.best_run"] == best_run
    assert parent.data.metrics["tune/best/eval/classification/macro_f1"] == pytest.approx(values[best_run])
    best = tracker.client.get_run(best_run)
    assert parent.data.params["tune.best.train.learning_rate"] == best.data.params["train.learning_rate"]
    figures = {a.path for a in tracker.client.list_artifacts(result.run_id, "tune")}
    assert "tune/eval_classification_macro_f1_per_trial.png" in figures


@pytest.mark.slow
def test_asha_stops_a_diverging_trial_early(tmp_path, local_ray):
    from grnx_core.tracking import Tracker
    from grnx_core.tuning import run_tune

    data = json.loads(json.dumps(MLP_TUNE))
    data["train"].update(epochs=4)
    # A learning rate of 1e-7 leaves the loss where it starts: clearly worse than 0.01 at epoch 1.
    data["tune"] = {
        "metric": "eval/classification/macro_f1",
        "mode": "max",
        "num_samples": 4,
        "n_initial_points": 2,
        "max_concurrent": 1,
        "seed": 1,
        "scheduler": {"type": "asha", "metric": "train/val_loss", "mode": "min", "grace_period": 1},
        "space": {"train.learning_rate": {"type": "choice", "values": [0.01, 0.0000001]}},
    }
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_tune(load_recipe(_write(tmp_path, data)), tracking_uri=uri)
    stopped = [t for t in result.trials if t.status == "stopped"]
    finished = [t for t in result.trials if t.status == "finished"]
    assert stopped, [(t.settings, t.status) for t in result.trials]
    assert all(t.settings["train.learning_rate"] == 0.0000001 and t.epochs < 4 for t in stopped)
    assert all(t.epochs == 4 for t in finished)
    tracker = Tracker(uri)
    killed = [t for t in _children(tracker, result.run_id, "trial") if t.info.status == "KILLED"]
    assert len(killed) == len(stopped)
    assert all("stopped early" in t.data.tags["grnx.tune.stopped"] for t in killed)


@pytest.mark.slow
def test_a_tune_against_a_ground_truth_split_reports_the_held_out_part(tmp_path, local_ray):
    from grnx_core.data_types import pair_ids
    from grnx_core.tracking import Tracker
    from grnx_core.tuning import run_tune

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_tune(load_recipe(_write(tmp_path, PEARSON_TUNE)), tracking_uri=uri)
    metric = "eval/auprc/pearson/truth_genes/epr"
    assert result.best is not None and math.isfinite(result.metrics[f"tune/held_out/{metric}"])
    tracker = Tracker(uri)
    (held_out,) = _children(tracker, result.run_id, "held_out")
    best = tracker.client.get_run(result.best.run_id)
    tuned_edges = best.data.metrics["eval/auprc/pearson/truth_genes/gt_edges"]
    held_out_edges = held_out.data.metrics["eval/auprc/pearson/truth_genes/gt_edges"]
    # The source's planted network, read directly: the two parts share no pair and make it whole.
    from grnx_plugins.data.synthetic import Synthetic

    network = Synthetic(**PEARSON_TUNE["data"]["params"]).ground_truth()
    pairs = {
        p for p in pair_ids(network["source"], network["target"], True) if p.split("|")[0] != p.split("|")[1]
    }
    n_pairs = len(pairs)
    assert tuned_edges + held_out_edges == n_pairs
    assert tuned_edges == round(0.5 * n_pairs)
    assert held_out.data.metrics[metric] == pytest.approx(result.metrics[f"tune/held_out/{metric}"])


@pytest.mark.slow
def test_an_interrupted_tune_resumes_under_the_same_parent_run(tmp_path, local_ray, monkeypatch):
    from grnx_core import tuning
    from grnx_core.tracking import Tracker

    data = _with_tune(PEARSON_TUNE, num_samples=3, ground_truth_split=None)
    path = _write(tmp_path, data)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    completed = tuning._TrialLog.completed

    def interrupt_after_first(self, trial):
        completed(self, trial)
        raise KeyboardInterrupt("test interrupt")

    monkeypatch.setattr(tuning._TrialLog, "completed", interrupt_after_first)
    with pytest.raises(KeyboardInterrupt):
        tuning.run_tune(load_recipe(path), tracking_uri=uri)
    monkeypatch.setattr(tuning._TrialLog, "completed", completed)
    tracker = Tracker(uri)
    (first,) = tracker.client.search_runs(
        [tracker.experiment_id("tune_pearson_test")], filter_string="tags.`grnx.child` = 'tune'"
    )
    assert first.info.status == "FAILED"

    result = tuning.run_tune(load_recipe(path), tracking_uri=uri)
    assert result.resumed and result.run_id == first.info.run_id and result.status == "FINISHED"
    parents = tracker.client.search_runs(
        [tracker.experiment_id("tune_pearson_test")], filter_string="tags.`grnx.child` = 'tune'"
    )
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(t.number for t in result.trials) == [1, 2, 3]
    finished = [t for t in _children(tracker, result.run_id, "trial") if t.info.status == "FINISHED"]
    assert len({t.data.tags["grnx.tune.trial_id"] for t in finished}) == 3


# -- the ground-truth split the tune sets -------------------------------------------------------


@pytest.mark.parametrize("directed", [True, False])
def test_edge_split_parts_are_disjoint_make_the_whole_and_keep_both_orientations_together(directed):
    import numpy as np
    import pandas as pd

    from grnx_core.data_types import GroundTruth, pair_ids
    from grnx_plugins.evaluators.ground_truth import EdgeSplit, split_edges

    rng = np.random.default_rng(3)
    genes = [f"G{i}" for i in range(40)]
    edges = pd.DataFrame({"source": rng.choice(genes, 300), "target": rng.choice(genes, 300)})
    # undirected truths often list a pair both ways (BEELINE's STRING lists)
    edges = pd.concat([edges, edges.rename(columns={"source": "target", "target": "source"})])
    truth = GroundTruth(edges=edges, directed=directed, name="toy")
    whole = set(pair_ids(truth.edges["source"], truth.edges["target"], directed))

    def pairs(part, seed=0):
        kept = split_edges(truth, EdgeSplit(part=part, fraction=0.3, seed=seed))
        return set(pair_ids(kept.edges["source"], kept.edges["target"], directed))

    tune_part, report_part = pairs("tune"), pairs("report")
    assert tune_part.isdisjoint(report_part) and tune_part | report_part == whole
    assert len(tune_part) == round(0.3 * len(whole))
    assert pairs("tune") == tune_part and pairs("tune", seed=1) != tune_part


def test_an_edge_split_that_leaves_a_part_empty_is_refused():
    import pandas as pd

    from grnx_core.data_types import GroundTruth
    from grnx_core.errors import DataError
    from grnx_plugins.evaluators.ground_truth import EdgeSplit, split_edges

    truth = GroundTruth(
        edges=pd.DataFrame({"source": ["A", "B"], "target": ["B", "C"]}), directed=True, name="t"
    )
    with pytest.raises(DataError, match="one part is empty"):
        split_edges(truth, EdgeSplit(part="tune", fraction=0.1))


ATTENTION_TUNE = {
    "schema_version": 1,
    "name": "attention_tune_test",
    "seed": 0,
    "data": {
        "name": "synthetic",
        "params": {"n_cells": 200, "n_genes": 20, "n_regulators": 4, "seed": 0},
        "label_key": "disease",
    },
    "preprocess": [
        {"name": "normalize_total", "params": {"target_sum": 10000}},
        {"name": "log1p", "params": {}},
    ],
    "tokenizer": {"name": "expression_scaled", "params": {"max_length": 16}},
    "model": {
        "name": "celluformer",
        "params": {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 16, "dropout": 0.0},
    },
    "train": {"epochs": 1, "batch_size": 32, "learning_rate": 0.001, "optimizer": "adam", "device": "cpu"},
    "extractors": [{"name": "attention", "params": {"variant": "all", "batch_size": 16}}],
    "evaluators": [{"name": "auprc", "params": {"ground_truth": {"source": "data"}}}],
    # attention chunks go to Ray from inside each trial, into the slot reserved for them
    "execution": {"num_workers": 2},
    "tracking": {"experiment": "tune_attention_test"},
    "tune": {
        "metric": "eval/auprc/attention/truth_genes/auprc",
        "mode": "max",
        "num_samples": 2,
        "n_initial_points": 1,
        "max_concurrent": 1,
        "space": {"train.learning_rate": {"type": "loguniform", "low": 0.0001, "high": 0.01}},
    },
}


def test_trials_reserve_slots_for_their_own_ray_tasks_or_run_their_steps_in_process():
    """num_workers > 1: a trial holds its CPU and num_workers - 1 slots for its steps' Ray tasks;
    otherwise the trial's steps run in its process (no ray_address inside the trial)."""
    from ray import tune

    from grnx_core.recipe import TuneSpec
    from grnx_core.tuning import trial_resources

    spec = TuneSpec.model_validate(ATTENTION_TUNE["tune"])
    reserved = trial_resources(spec, 3)
    assert isinstance(reserved, tune.PlacementGroupFactory)
    assert reserved.bundles == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}]
    assert trial_resources(spec, 1) == {"cpu": 1.0, "gpu": 0.0}
    plain = json.loads(json.dumps(ATTENTION_TUNE))
    plain["execution"] = {"num_workers": None, "ray_address": "127.0.0.1:6379"}
    job = TrialJob.of(load_recipe_data_dict(plain))
    assert job.data["execution"] == {"num_workers": 1, "ray_address": None}


def load_recipe_data_dict(data: dict):
    from grnx_core.recipe import LoadedRecipe, Origins, validate_recipe
    from grnx_core.registry import default_registry

    return validate_recipe(LoadedRecipe(Path("<test>"), data, "", [], Origins()), default_registry())


def test_a_tune_whose_trials_send_attention_chunks_to_ray_finishes(tmp_path, local_ray):
    """Before trials reserved slots, Ray refused every trial's attention tasks ("No trial resources")."""
    from grnx_core.tuning import run_tune

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_tune(load_recipe(_write(tmp_path, ATTENTION_TUNE)), tracking_uri=uri)
    assert result.status == "FINISHED"
    assert [t.status for t in result.trials] == ["finished", "finished"]
