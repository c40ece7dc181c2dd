"""recipes/wds/wds_protocol.yaml at small scale: the WDS paper's protocol as data.

The model is trained once on every training cell; each sweep point (sampler x fraction) samples
and extracts per repeat; one full-data reference serves every point; the parent run holds NES mean
and MSE against the full data per point, and the figure of NES against the fraction.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from grnx_core.cache import Cache
from grnx_core.recipe import load_recipe
from grnx_core.runner import Runner
from grnx_core.tracking import Tracker

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "wds" / "wds_protocol.yaml"
SMALL = [
    "data.params.n_cells=400",
    "data.params.n_genes=40",
    "data.params.n_regulators=8",
    "sampler.repeats=2",
    "train.epochs=1",
    "evaluators.0.params.permutations=200",
    "sweep.grid={sampler.name: [wds, uniform], sampler.params.fraction: [0.05, 0.2]}",
]


def test_wds_protocol_trains_once_and_reports_each_sampler_and_fraction(tmp_path):
    tracker = Tracker(os.environ["MLFLOW_TRACKING_URI"])
    resolved = load_recipe(RECIPE, SMALL)
    result = Runner(resolved, tracker=tracker, cache=Cache(tmp_path / "cache")).run()
    roles = [child.child.role for child in result.children]
    assert roles.count("repeat") == 8 and roles.count("reference") == 1, (
        "2 samplers x 2 fractions x 2 repeats + 1 reference"
    )
    model_runs = [report.cached for report in result.stages if report.stage == "model"]
    assert len(model_runs) == 9 and model_runs.count(False) == 1, "the model is trained once for all children"
    samples = [child.sample.sample for child in result.children if child.child.role == "repeat"]
    assert sorted({s.n_cells for s in samples}) == [20, 80]
    for group in (
        "name_wds-fraction_0.05",
        "name_wds-fraction_0.2",
        "name_uniform-fraction_0.05",
        "name_uniform-fraction_0.2",
    ):
        for extractor in ("attention", "pearson"):
            assert f"sweep/{group}/eval/nes_stability/{extractor}/nes_mse" in result.metrics
            assert result.metrics[f"sweep/{group}/eval/nes_stability/{extractor}/n_repeats"] == 2
    reference = next(child for child in result.children if child.child.role == "reference")
    full_nes = reference.leaf.metrics["eval/nes_stability/pearson/nes"]
    repeats = [
        c.leaf.metrics["eval/nes_stability/pearson/nes"]
        for c in result.children
        if c.child.role == "repeat"
        and c.child.resolved.recipe.sampler.name == "wds"
        and c.child.resolved.recipe.sampler.params["fraction"] == 0.05
    ]
    expected_mse = sum((value - full_nes) ** 2 for value in repeats) / len(repeats)
    assert result.metrics["sweep/name_wds-fraction_0.05/eval/nes_stability/pearson/nes_mse"] == pytest.approx(
        expected_mse
    )
    artifacts = {a.path for a in MlflowClient(tracker.tracking_uri).list_artifacts(result.run_id, "sweep")}
    assert "sweep/eval_nes_stability_attention_nes_vs_sampler.params.fraction.png" in artifacts
