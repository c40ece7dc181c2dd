"""The grnx command's conventions: overrides, plugin look-ups, out of memory, refused recipes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from grnx_core.cli import _is_loopback, main
from grnx_core.tracking import Tracker

RECIPE = textwrap.dedent("""
    schema_version: 1
    name: cli-input
    data: {name: scanpy_builtin, params: {dataset: krumsiek11}}
    extractors: [{name: pearson}]
""")


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture
def fresh_stores(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A cache folder and a tracking store of this test alone, neither created yet."""
    cache, database = tmp_path / "cache", tmp_path / "store" / "mlflow.db"
    monkeypatch.setenv("GRNX_CACHE_DIR", str(cache))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    return cache, database


# -- overrides: positional KEY=VALUE or --set, for run, show and validate alike --------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["show", "{r}", "seed=5"],
        ["show", "{r}", "--set", "seed=5"],
        ["show", "--set", "seed=5", "{r}"],
        ["show", "{r}", "--debug", "seed=5"],  # an override after an option
    ],
)
def test_show_takes_overrides_either_way(recipe, capsys, argv):
    assert main([a.replace("{r}", str(recipe)) for a in argv]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["seed"] == 5


def test_validate_takes_positional_overrides(recipe, capsys):
    # It used to answer "recipe file not found: seed=1".
    assert main(["validate", str(recipe), "seed=1"]) == 0
    assert main(["validate", str(recipe), "seed=-1"]) == 2
    err = capsys.readouterr().err
    assert "override 'seed=-1': seed: input should be greater than or equal to 0, got -1." in err


def test_validate_applies_overrides_to_every_recipe(tmp_path, recipe, capsys):
    other = tmp_path / "other.yaml"
    other.write_text(RECIPE)
    assert main(["validate", str(recipe), str(other), "--set", "train.epochs=0"]) == 2
    assert capsys.readouterr().err.count("train.epochs: input should be greater than or equal to 1") == 2


def test_run_takes_overrides_after_options(recipe, capsys):
    assert main(["run", str(recipe), "--no-track", "--no-cache", "extractors.0.params.top_k=3"]) == 0
    assert "run (not tracked): FINISHED" in capsys.readouterr().out


def test_an_argument_with_equals_that_is_a_file_is_a_recipe(tmp_path, capsys):
    path = tmp_path / "seed=2.yaml"
    path.write_text(RECIPE)
    assert main(["show", str(path), "seed=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["seed"] == 3


def test_run_and_show_take_one_recipe(tmp_path, recipe, capsys):
    assert main(["show", str(recipe), str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "grnx show takes one recipe file, got 2" in err and "Overrides are KEY=VALUE" in err
    assert main(["run", "--set", "seed=1", "seed=2"]) == 2
    assert "grnx run takes one recipe file, got none" in capsys.readouterr().err


def test_an_unknown_option_is_still_refused(recipe, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(recipe), "--no-cahce"])
    assert exit_.value.code == 2 and "unrecognized arguments: --no-cahce" in capsys.readouterr().err


# -- grnx plugins -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["extractors", "extractor", "Extractors"])
def test_plugins_takes_a_kind_or_its_plural(capsys, kind):
    assert main(["plugins", kind]) == 0
    out = capsys.readouterr().out
    assert out.startswith("extractors (") and "pearson: Gene pairs ranked by Pearson" in out
    assert "rank_by (Literal['abs', 'value'], default 'abs')" in out


def test_plugins_finds_the_kind_of_a_name_given_alone(capsys):
    assert main(["plugins", "pearson"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("extractors (1):\n  pearson: ") and "params:" in out
    assert main(["plugins", "data sources"]) == 0
    assert capsys.readouterr().out.startswith("data sources (")


def test_plugins_suggests_names_and_kinds(capsys):
    assert main(["plugins", "pearsn"]) == 2
    assert "No kind or component named 'pearsn'. Did you mean 'pearson' (extractor)?" in (
        capsys.readouterr().err
    )
    assert main(["plugins", "extractr", "pearson"]) == 2
    assert "Unknown kind 'extractr'. Did you mean 'extractor'?" in capsys.readouterr().err


def test_plugins_describes_the_fields_of_nested_params(capsys):
    assert main(["plugins", "evaluator", "auprc"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ground_truth = next(line for line in lines if line.strip().startswith("ground_truth ("))
    assert ground_truth.startswith("      ground_truth (GroundTruthSpec, default: as below): ")
    assert len(ground_truth) < 200  # not the 300-character repr of the default
    nested = lines[lines.index(ground_truth) + 1]
    assert nested.startswith("          source (Literal['data', 'file'], default 'data'): ")
    disease_genes_path = "              path (str, required): "
    assert any(line.startswith(disease_genes_path) for line in lines)


# -- faults at run time -------------------------------------------------------------------------


def test_out_of_memory_is_a_user_error_that_names_the_stage(recipe, capsys, monkeypatch):
    from grnx_plugins.extractors import pearson

    def too_large(self, context):
        raise MemoryError("Unable to allocate 728. TiB for an array with shape (100000000000000,)")

    monkeypatch.setattr(pearson.PearsonExtractor, "extract", too_large)
    assert main(["run", str(recipe), "--no-track", "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert "error: out of memory in stage 'extract:pearson': Unable to allocate 728. TiB" in err
    assert "lower it" in err and "Traceback" not in err and "bug in grnx" not in err


# -- a refused recipe leaves nothing behind ------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        RECIPE.replace("pearson", "pearsn"),  # the recipe itself
        RECIPE + "sweep: {grid: {extractors.0.params.top_k: [5, 0]}}\n",  # one child of its sweep
    ],
    ids=["recipe", "sweep-child"],
)
def test_a_refused_recipe_writes_no_run_and_no_cache_entry(tmp_path, fresh_stores, capsys, text):
    cache, database = fresh_stores
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["run", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not cache.exists()
    assert not database.exists()


def test_the_summary_links_the_run_in_the_ui(recipe, fresh_stores, capsys):
    _, database = fresh_stores
    assert main(["run", str(recipe), "--no-cache"]) == 0
    view = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("view:"))
    run = MlflowClient(f"sqlite:///{database}").search_runs(
        [MlflowClient(f"sqlite:///{database}").get_experiment_by_name("grnx").experiment_id]
    )[0]
    url = (
        f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        "?workflowType=machine_learning"
    )
    assert view.strip() == f"view: {url} (start the UI with grnx ui)"


# -- grnx ui ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host,loopback",
    [("127.0.0.1", True), ("127.0.1.1", True), ("localhost", True), ("::1", True), ("0.0.0.0", False)]
    + [("::", False), ("192.168.1.5", False), ("myhost.example", False)],
)
def test_only_loopback_hosts_count_as_this_machine(host, loopback):
    assert _is_loopback(host) is loopback


@pytest.mark.parametrize("host,warned", [("0.0.0.0", True), ("127.0.0.1", False)])
def test_ui_warns_when_it_listens_beyond_this_machine(fresh_stores, capsys, monkeypatch, host, warned):
    started = []
    real_popen = subprocess.Popen

    def popen(command, **kwargs):  # the server is not started: a process that ends at once stands in
        started.append((command, kwargs))
        return real_popen([sys.executable, "-c", "pass"], **kwargs)

    _, database = fresh_stores
    experiment_id = Tracker(f"sqlite:///{database}").experiment_id("ui-test")
    monkeypatch.setattr(subprocess, "Popen", popen)
    assert main(["ui", "--host", host, "--port", "5999"]) == 0
    err = capsys.readouterr().err
    assert ("warning: the MLflow UI has no authentication" in err) is warned
    assert "MLflow UI on http://127.0.0.1:5999" in err
    # The runs table, not the GenAI view that MLflow 3's UI opens an experiment in.
    url = f"http://127.0.0.1:5999/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    assert f"runs of 'ui-test': {url}" in err
    ((command, kwargs),) = started
    assert kwargs["start_new_session"] is True
    assert command[command.index("--host") + 1] == host
