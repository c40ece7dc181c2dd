"""benchmarks/study_results.py: the study document from a tracking store.

A tiny recipe with wds_study.yaml's name and experiment (300 simulated cells, Pearson, 2 repeats at
two fractions beside a full-data reference, NES with 100 permutations) is run into a temporary
store; the document's Table 3 numbers are checked against the child runs' metrics read from MLflow
directly: the mean and its t-interval with statsmodels' ``DescrStatsW.tconfint_mean``, the MSE of
NES against the reference run computed here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from statsmodels.stats.weightstats import DescrStatsW

from grnx_core.recipe import load_recipe
from grnx_core.runner import run_recipe
from grnx_core.tracking import Tracker

from .tiny_recipes import LOG_NORMALISE, tiny_synthetic_data

ROOT = Path(__file__).resolve().parents[2]
FRACTIONS = [0.3, 0.6]

TINY_WDS_STUDY = {
    "schema_version": 1,
    "name": "wds_study",  # the tag the document looks for: wds_study.yaml's name
    "seed": 0,
    "data": tiny_synthetic_data(300),
    "preprocess": LOG_NORMALISE,
    "sampler": {"name": "uniform", "params": {"fraction": 0.5}, "repeats": 2, "reference": True},
    "extractors": [{"name": "pearson", "params": {"rank_by": "abs"}}],
    "evaluators": [
        {
            "name": "nes_stability",
            "params": {"ground_truth": {"source": "data"}, "permutations": 100, "seed": 6, "plot": False},
        }
    ],
    "tracking": {"experiment": "wds_study"},
    "sweep": {"grid": {"sampler.params.fraction": FRACTIONS}},
}


def _driver(monkeypatch):
    spec = importlib.util.spec_from_file_location("study_results", ROOT / "benchmarks" / "study_results.py")
    driver = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "study_results", driver)  # its dataclasses look it up
    spec.loader.exec_module(driver)
    return driver


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    recipe = folder / "tiny_wds_study.yaml"
    recipe.write_text(yaml.safe_dump(TINY_WDS_STUDY))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    run_recipe(load_recipe(recipe), tracking_uri=uri)
    return uri, folder


def test_document_tables_are_the_tracked_runs_with_the_paper_line(tracked, monkeypatch):
    uri, folder = tracked
    driver = _driver(monkeypatch)
    out = folder / "docs" / "results.md"
    recipes = ("wds/wds_study", "wds/wds_study_nid")
    driver.write_results(uri, out, "python benchmarks/study_results.py --report-only", [], recipes)
    text = out.read_text()
    assert text.startswith("# Study results")
    assert "Made by: `python benchmarks/study_results.py --report-only`" in text
    table3 = text.split("## WDS paper Table 3")[1].split("\n## ")[0]
    # the paper's figures beside ours, with their source (reviews quoting the paper's tables)
    assert "| L6_CT | 1.18 | 1.19 | 0.85 |" in table3 and "OpenReview 44IKUSdbUD" in table3
    # the recipe with no runs in the store is listed as not measured, not left out
    nid = text.split("## WDS paper Table 1, MLP row")[1].split("\n## ")[0]
    assert "MLP accuracy 97.25%" in nid and "Not measured" in nid
    assert "| WDS paper Table 1, MLP row: held-out classification | `recipes/wds/wds_study_nid.yaml`" in text
    # the full report of the experiment beside it
    assert (folder / "docs" / "results" / "wds_study.md").exists()

    client = Tracker(uri).client
    experiment = client.get_experiment_by_name("wds_study")
    runs = client.search_runs([experiment.experiment_id])
    key = "eval/nes_stability/pearson/nes"
    table = pd.read_csv(folder / "docs" / "results" / "tables" / "wds_study_nes_stability_nes.csv")
    reference = [r.data.metrics[key] for r in runs if r.data.tags.get("grnx.child") == "reference"]
    assert len(reference) == 1
    for fraction in FRACTIONS:
        values = [
            r.data.metrics[key]
            for r in runs
            if r.data.tags.get("grnx.child") == "repeat"
            and float(r.data.params["sampler.params.fraction"]) == fraction
        ]
        assert len(values) == 2
        row = table[table["sampler.params.fraction"].astype(str) == str(fraction)].iloc[0]
        low, high = DescrStatsW(np.asarray(values)).tconfint_mean(alpha=0.05)
        assert row["n"] == 2 and row["mean"] == pytest.approx(np.mean(values))
        assert (row["low"], row["high"]) == (pytest.approx(low), pytest.approx(high))
        # Table 3's MSE against the full-data NES, as the parent logged it and the document shows it
        mse = float(np.mean((np.asarray(values) - reference[0]) ** 2))
        assert f"{mse:.3f}" in table3 or f"{mse:.3g}" in table3
    assert "![nes_stability nes" in table3
    figure = table3.split("](")[1].split(")")[0]
    assert (out.parent / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_study_recipe_is_refused(monkeypatch, capsys):
    driver = _driver(monkeypatch)
    with pytest.raises(SystemExit) as raised:
        driver.parse_args(["--recipes", "wds/no_such_study"])
    assert raised.value.code == 2
    assert "unknown study recipe(s) wds/no_such_study" in capsys.readouterr().err


def test_every_study_table_names_a_study_recipe_that_validates(monkeypatch):
    driver = _driver(monkeypatch)
    assert {study.recipe for study in driver.STUDY_TABLES} == set(driver.STUDY_RECIPES)
    for recipe in driver.STUDY_RECIPES:
        path = driver.recipe_path(recipe)
        if driver.missing_inputs(path):  # e.g. ../shared/data: tests/test_recipes.py skips it too
            continue
        load_recipe(path)
