"""`grnx compare`: an experiment's runs in a table, children under parents, differing params, metrics."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from grnx_core.cli import main
from grnx_core.compare import compare_table
from grnx_core.recipe import load_recipe
from grnx_core.runner import run_recipe
from grnx_core.tracking import Tracker

from .tiny_recipes import LOG_NORMALISE, tiny_synthetic_data

SWEEP = {
    "schema_version": 1,
    "name": "compare_sweep",
    "seed": 0,
    "data": tiny_synthetic_data(200),
    "preprocess": LOG_NORMALISE,
    "extractors": [{"name": "pearson", "params": {"rank_by": "abs"}}],
    "evaluators": [{"name": "auprc", "params": {"ground_truth": {"source": "data"}}}],
    "tracking": {"experiment": "compare_test"},
    "sweep": {
        "grid": {
            "extractors.0.params.rank_by": ["abs", "value"],
            "preprocess.0.params.target_sum": [100, 10000],
        }
    },
}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    recipe = folder / "sweep.yaml"
    recipe.write_text(yaml.safe_dump(SWEEP))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    result = run_recipe(load_recipe(recipe), tracking_uri=uri)
    return uri, result, folder


def test_compare_lists_the_swept_params_and_metrics_with_children_under_the_parent(swept):
    uri, result, _ = swept
    table = compare_table(Tracker(uri), "compare_test")
    assert list(table["run_id"]) == [result.run_id, *result.child_run_ids]
    assert table["run"].iloc[0].startswith("compare_sweep")
    assert all(name.startswith("└ ") for name in table["run"].iloc[1:])
    # The swept paths are the params that differ (the parent has neither value: it differs too).
    assert {"extractors.0.params.rank_by", "preprocess.0.params.target_sum"} <= set(table.columns)
    children = table.iloc[1:]
    points = set(zip(children["extractors.0.params.rank_by"], children["preprocess.0.params.target_sum"]))
    assert points == {("abs", "100.0"), ("abs", "10000.0"), ("value", "100.0"), ("value", "10000.0")}
    assert "seed" not in table.columns  # the same in every run
    # each child's metric is the one MLflow holds for it
    client = Tracker(uri).client
    for run_id, value in zip(children["run_id"], children["eval/auprc/pearson/truth_genes/epr"]):
        assert value == pytest.approx(
            client.get_run(run_id).data.metrics["eval/auprc/pearson/truth_genes/epr"]
        )
    assert not any(name.endswith("_random") for name in table.columns)


def test_grnx_compare_prints_the_table_and_writes_csv(swept, capsys):
    uri, result, folder = swept
    target = folder / "runs.csv"
    code = main(
        ["compare", "compare_test", "--metric", "eval/*/auprc", "--csv", str(target), "--tracking-uri", uri]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert result.run_id in printed and "eval/auprc/pearson/truth_genes/auprc" in printed
    written = pd.read_csv(target)
    assert len(written) == 5 and "eval/auprc/pearson/truth_genes/auprc" in written.columns
    assert "eval/auprc/pearson/truth_genes/epr" not in written.columns  # only the metrics asked for


def test_grnx_compare_on_an_unknown_experiment_names_the_close_one(swept, capsys):
    uri, _, _ = swept
    assert main(["compare", "compare_tset", "--tracking-uri", uri]) == 2
    assert "Did you mean 'compare_test'" in capsys.readouterr().err


def test_a_setting_logged_null_equals_one_not_logged():
    """A run made before a setting existed lacks its param; one made after logs it as null: the same
    setting, so neither a differing param nor a reason to keep both runs."""
    from types import SimpleNamespace

    from grnx_core.compare import _differing_params, set_params

    def run(**params):
        return SimpleNamespace(data=SimpleNamespace(params=params))

    before, after = run(a="1"), run(a="1", b="null")
    assert set_params(after) == set_params(before) == {"a": "1"}
    assert _differing_params([before, after]) == []
    assert _differing_params([before, run(a="1", b="2")]) == ["b"]
