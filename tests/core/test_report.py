"""`grnx report`: per-group means and t-intervals of the child runs' metrics, as markdown, CSV and PNG.

The reference values are computed here from the metrics MLflow holds for each child run, with
statsmodels' ``DescrStatsW.tconfint_mean`` (an implementation of the t-interval independent of the
report's ``scipy.stats.t`` quantile).
"""

from __future__ import annotations

import math
import re
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from statsmodels.stats.weightstats import DescrStatsW

from grnx_core.cli import main
from grnx_core.recipe import load_recipe
from grnx_core.report import parse_metric, t_interval
from grnx_core.runner import run_recipe
from grnx_core.tracking import Tracker
from grnx_plugins.evaluators.auprc import AuprcEvaluator

from .tiny_recipes import LOG_NORMALISE, tiny_synthetic_data

#: The auprc evaluator scores Pearson over each extractor's own pairs when asked (baseline_extractor).
SAME_PAIRS = "baseline_extractor" in AuprcEvaluator.Params.model_fields
EXPERIMENT = "report_test"
FRACTIONS = [0.3, 0.6]
REPEATS = 3

SWEEP = {
    "schema_version": 1,
    "name": "report_sweep",
    "seed": 0,
    "data": tiny_synthetic_data(300),
    "preprocess": LOG_NORMALISE,
    "sampler": {"name": "uniform", "params": {"fraction": 0.5}, "repeats": REPEATS},
    "extractors": [
        {"name": "pearson", "params": {"rank_by": "abs"}},
        {"name": "spearman", "params": {"rank_by": "abs"}},
    ],
    "evaluators": [
        {
            "name": "auprc",
            "params": {
                "ground_truth": {"source": "data"},
                "plot": False,
                **({"baseline_extractor": "pearson"} if SAME_PAIRS else {}),
            },
        }
    ],
    "tracking": {"experiment": EXPERIMENT},
    "sweep": {"grid": {"sampler.params.fraction": FRACTIONS}},
}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    recipe = folder / "sweep.yaml"
    recipe.write_text(yaml.safe_dump(SWEEP))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    result = run_recipe(load_recipe(recipe), tracking_uri=uri)
    return uri, result, folder


def _children(uri: str, parent_run_id: str) -> list:
    client = Tracker(uri).client
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )


def _key(children: list, extractor: str, metric: str) -> str:
    """The logged key of ``metric`` for ``extractor``, found by its parts (the evaluator may put a
    gene-universe segment between them: eval/auprc/<extractor>[/<universe>]/<metric>)."""
    keys = {
        key
        for child in children
        for key in child.data.metrics
        if key.startswith(f"eval/auprc/{extractor}/") and key.endswith(f"/{metric}")
    }
    assert len(keys) == 1, keys
    return keys.pop()


def _expected(children: list, metric: str) -> dict[float, tuple[float, float, float, int]]:
    """fraction -> (mean, low, high, n) of ``metric`` over that fraction's children."""
    by_fraction: dict[float, list[float]] = {}
    for child in children:
        fraction = float(child.data.params["sampler.params.fraction"])
        by_fraction.setdefault(fraction, []).append(child.data.metrics[metric])
    expected = {}
    for fraction, values in by_fraction.items():
        stats = DescrStatsW(np.array(values))
        low, high = stats.tconfint_mean(alpha=0.05)
        expected[fraction] = (float(np.mean(values)), float(low), float(high), len(values))
    return expected


def test_report_tables_are_the_means_and_t_intervals_of_the_child_runs(swept, capsys):
    uri, result, folder = swept
    out = folder / "out"
    assert main(["report", EXPERIMENT, "--out", str(out), "--tracking-uri", uri]) == 0
    assert "wrote" in capsys.readouterr().out
    children = _children(uri, result.run_id)
    assert len(children) == len(FRACTIONS) * REPEATS
    table = pd.read_csv(out / "tables" / "report_sweep_auprc_auprc.csv")
    table["extractor"] = table["subject"].str.split("/").str[0]
    assert sorted(table["extractor"]) == ["pearson"] * 2 + ["spearman"] * 2
    assert sorted(table["sampler.params.fraction"].unique()) == FRACTIONS
    markdown = (out / "report.md").read_text()
    for extractor in ("pearson", "spearman"):
        expected = _expected(children, _key(children, extractor, "auprc"))
        random = _expected(children, _key(children, extractor, "auprc_random"))
        pearson = _expected(children, _key(children, "pearson", "auprc"))
        rows = table[table["extractor"] == extractor]
        for _, row in rows.iterrows():
            mean, low, high, n = expected[row["sampler.params.fraction"]]
            assert row["n"] == n == REPEATS
            assert row["mean"] == pytest.approx(mean, rel=1e-12)
            assert row["low"] == pytest.approx(low, rel=1e-9)
            assert row["high"] == pytest.approx(high, rel=1e-9)
            assert row["baseline"] == pytest.approx(random[row["sampler.params.fraction"]][0])
            # the markdown shows the same numbers, rounded
            assert f"{mean:.3f} [{low:.3f}, {high:.3f}]" in markdown
            if extractor == "spearman" and SAME_PAIRS:
                # Pearson scored over spearman's own pairs, and the per-run ratio, with intervals
                theirs = _expected(children, _key(children, "spearman", "auprc_of_pearson"))
                ratio = _expected(children, _key(children, "spearman", "auprc_vs_pearson"))
                fraction = row["sampler.params.fraction"]
                assert row["baseline_pairs"] == "same pairs"
                assert row["pearson_mean"] == pytest.approx(theirs[fraction][0], rel=1e-12)
                assert row["pearson_low"] == pytest.approx(theirs[fraction][1], rel=1e-9)
                assert row["ratio_mean"] == pytest.approx(ratio[fraction][0], rel=1e-12)
                assert row["ratio_high"] == pytest.approx(ratio[fraction][2], rel=1e-9)
                assert (
                    f"{ratio[fraction][0]:.3f} [{ratio[fraction][1]:.3f}, {ratio[fraction][2]:.3f}]"
                    in markdown
                )
            elif extractor == "spearman":  # the pearson extractor's own values in the same runs
                theirs = pearson[row["sampler.params.fraction"]]
                assert row["baseline_pairs"] == "own universe"
                assert row["pearson_mean"] == pytest.approx(theirs[0], rel=1e-12)
                assert row["pearson_low"] == pytest.approx(theirs[1], rel=1e-9)
                assert row["ratio_mean"] == pytest.approx(mean / theirs[0], rel=1e-12)
            else:
                assert math.isnan(row["pearson_mean"])
    # grouped by the swept param; the repeat seed is the repeat axis, not a group
    assert "`sampler.params.fraction`" in markdown and "Repeats differ in `sampler.seed`" in markdown
    assert "sampler.seed" not in table.columns
    # the ratio metric is the base over its baseline: left out; counts and baselines are no tables
    tables = {path.name for path in (out / "tables").iterdir()}
    assert "report_sweep_auprc_epr.csv" in tables
    assert "report_sweep_auprc_auprc_ratio.csv" not in tables
    assert not any(name.endswith(("_random.csv", "n_candidates.csv")) for name in tables)
    assert markdown.startswith(f"# {EXPERIMENT}: report\n\nMade by: `grnx report {EXPERIMENT} --out")


def test_report_figures_are_valid_pngs(swept):
    import matplotlib.image

    uri, _, folder = swept
    out = folder / "figures_out"
    assert main(["report", EXPERIMENT, "--out", str(out), "--metric", "auprc", "--tracking-uri", uri]) == 0
    figures = sorted((out / "figures").glob("*.png"))
    assert [f.name for f in figures] == ["report_sweep_auprc_auprc_vs_fraction.png"]
    assert figures[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(figures[0])
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0  # something is drawn
    assert "](figures/report_sweep_auprc_auprc_vs_fraction.png)" in (out / "report.md").read_text()


def test_report_to_a_markdown_file_puts_figures_beside_it(swept):
    uri, _, folder = swept
    target = folder / "docs" / "bench.md"
    assert main(["report", EXPERIMENT, "--out", str(target), "--metric", "epr", "--tracking-uri", uri]) == 0
    assert (folder / "docs" / "bench" / "figures" / "report_sweep_auprc_epr_vs_fraction.png").is_file()
    assert "](bench/figures/report_sweep_auprc_epr_vs_fraction.png)" in target.read_text()
    # no temporary file is left behind
    assert not [p for p in (folder / "docs").iterdir() if p.name.startswith(".")]


def test_unknown_experiment_exits_2_without_traceback(swept, capsys):
    uri, _, folder = swept
    assert main(["report", "report_tset", "--out", str(folder / "x"), "--tracking-uri", uri]) == 2
    error = capsys.readouterr().err
    assert "no experiment 'report_tset'" in error and "Did you mean 'report_test'" in error
    assert "Traceback" not in error
    assert not (folder / "x").exists()


def test_a_metric_no_run_logged_exits_2(swept, capsys):
    uri, _, folder = swept
    code = main(["report", EXPERIMENT, "--out", str(folder / "y"), "--metric", "nes", "--tracking-uri", uri])
    assert code == 2
    assert "no finished run" in capsys.readouterr().err


def test_reference_rows_and_a_rerun_supersedes_the_earlier_one(tmp_path, capsys):
    recipe_data = {
        **SWEEP,
        "name": "report_reference",
        "sampler": {"name": "uniform", "params": {"fraction": 0.4}, "repeats": 2, "reference": True},
        "extractors": [
            {"name": "pearson", "params": {"rank_by": "abs"}},
            {"name": "spearman", "params": {"rank_by": "abs"}},
        ],
        "evaluators": [{"name": "auprc", "params": {"ground_truth": {"source": "data"}, "plot": False}}],
        "tracking": {"experiment": "report_reference"},
    }
    del recipe_data["sweep"]
    recipe = tmp_path / "reference.yaml"
    recipe.write_text(yaml.safe_dump(recipe_data))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_recipe(load_recipe(recipe), tracking_uri=uri)
    second = run_recipe(load_recipe(recipe), tracking_uri=uri)  # the same children again
    broken = Tracker(uri).start_run("report_reference", "killed", tags={"grnx.recipe": "report_reference"})
    broken.end("FAILED")
    out = tmp_path / "out"
    assert (
        main(["report", "report_reference", "--out", str(out), "--metric", "auprc", "--tracking-uri", uri])
        == 0
    )
    table = pd.read_csv(out / "tables" / "report_reference_auprc_auprc.csv")
    client = Tracker(uri).client
    newest = [client.get_run(run_id) for run_id in second.child_run_ids]
    key = _key(newest, "pearson", "auprc")
    sampled = [r.data.metrics[key] for r in newest if r.data.tags["grnx.child"] == "repeat"]
    reference = [r.data.metrics[key] for r in newest if r.data.tags["grnx.child"] == "reference"]
    table["extractor"] = table["subject"].str.split("/").str[0]
    sample_row = table[(table["cells"] == "sample") & (table["extractor"] == "pearson")].iloc[0]
    reference_row = table[(table["cells"] == "all (reference)") & (table["extractor"] == "pearson")].iloc[0]
    assert sample_row["n"] == 2 and sample_row["mean"] == pytest.approx(np.mean(sampled))
    assert reference_row["n"] == 1 and reference_row["mean"] == pytest.approx(reference[0])
    # without baseline_extractor, Pearson's column is the pearson extractor's own metric
    spearman = table[(table["cells"] == "sample") & (table["extractor"] == "spearman")].iloc[0]
    assert spearman["baseline_pairs"] == "own universe"
    assert spearman["pearson_mean"] == pytest.approx(np.mean(sampled))
    markdown = (out / "report.md").read_text()
    assert "3 earlier runs with the same params superseded" in markdown
    assert "not counted: 1 FAILED" in markdown
    assert re.search(r"\| all \(reference\) \| pearson[^|]* \| 1 \|", markdown)


@pytest.mark.parametrize("values", [[0.2, 0.4], [1.0, 2.0, 4.0, 8.0], list(np.linspace(0, 1, 20) ** 2)])
def test_t_interval_matches_statsmodels(values):
    interval = t_interval(values)
    low, high = DescrStatsW(np.array(values)).tconfint_mean(alpha=0.05)
    assert interval.n == len(values)
    assert interval.mean == pytest.approx(np.mean(values))
    assert (interval.low, interval.high) == pytest.approx((low, high), rel=1e-12)
    low90, _ = DescrStatsW(np.array(values)).tconfint_mean(alpha=0.10)
    assert t_interval(values, 0.90).low == pytest.approx(low90, rel=1e-12)


def test_t_interval_of_one_value_has_no_width_and_nan_is_left_out():
    single = t_interval([0.5, float("nan")])
    assert single.n == 1 and single.mean == 0.5 and math.isnan(single.low) and math.isnan(single.high)
    assert t_interval([]).n == 0


def test_metric_names_are_parsed_by_suffix():
    from grnx_plugins.evaluators.auprc import AuprcEvaluator
    from grnx_plugins.evaluators.classification import ClassificationEvaluator

    plain = parse_metric("eval/auprc/grnboost2/auprc", AuprcEvaluator.declares)
    assert (plain.evaluator, plain.subject, plain.metric) == ("auprc", ("grnboost2",), "auprc")
    assert plain.with_metric("auprc_random") == "eval/auprc/grnboost2/auprc_random"
    assert plain.with_extractor("pearson") == "eval/auprc/pearson/auprc"
    # a gene-universe segment between the extractor and the metric
    universe = parse_metric("eval/auprc_u/grnboost2/truth_genes/epr", AuprcEvaluator.declares)
    assert (universe.subject, universe.metric) == (("grnboost2", "truth_genes"), "epr")
    assert universe.with_extractor("pearson") == "eval/auprc_u/pearson/truth_genes/epr"
    # a qualifier after the metric (the class of a per-class F1)
    per_class = parse_metric("eval/classification/f1/B cell", ClassificationEvaluator.declares)
    assert (per_class.metric, per_class.subject) == ("f1", ("B cell",))
    # without the evaluator's declarations, the last segment
    assert parse_metric("eval/third_party/x/score").metric == "score"
    assert parse_metric("train/loss") is None


def test_the_benchmark_driver_gives_recipes_that_validate(monkeypatch):
    """benchmarks/grn_benchmark.py's scale options become overrides of valid recipes."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("grn_benchmark", root / "benchmarks" / "grn_benchmark.py")
    driver = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "grn_benchmark", driver)  # its dataclasses look it up
    spec.loader.exec_module(driver)
    monkeypatch.chdir(root)
    options = driver.parse_args(["--quick"])
    for name in driver.available_recipes():
        path = driver.RECIPES / f"{name}.yaml"
        if driver.missing_inputs(path):
            continue
        resolved = load_recipe(path, driver.overrides_for(path, options))
        recipe = resolved.recipe
        assert recipe.sampler.repeats == 3 and recipe.tracking.experiment == "grn_benchmark_quick"
        assert recipe.sweep.grid["sampler.params.fraction"] == [0.05, 0.1]
        ids = [step.step_id for step in resolved.steps_of("extractors")]
        assert "pearson" in ids and "genie3" not in ids
        if recipe.data.name == "synthetic":
            assert recipe.data.params["n_cells"] == 2000
    # a recipe that sweeps one sampler's settings keeps its sampler
    path = driver.RECIPES / "synthetic_wds_settings.yaml"
    assert load_recipe(path, driver.overrides_for(path, options)).recipe.sweep.grid["sampler.name"] == ["wds"]


def test_an_experiment_whose_runs_all_failed_exits_2(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(uri).start_run("report_failed", "killed", tags={"grnx.recipe": "r"}).end("FAILED")
    assert main(["report", "report_failed", "--out", str(tmp_path / "out"), "--tracking-uri", uri]) == 2
    assert "no finished run of experiment 'report_failed'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.md").exists()


@pytest.mark.parametrize("n_labels", [2, 6, 9])
def test_figure_legends_fit_inside_the_figure(n_labels):
    """legend_grid's columns keep the legend inside the figure, as matplotlib's renderer measures it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from grnx_core.report import legend_grid

    labels = [f"wds, R={100 * (i + 1)}, weights=softmax" for i in range(n_labels - 1)] + [
        "all cells (reference)"
    ]
    figure, axis = plt.subplots(figsize=(6.8, 2.9))
    handles = [axis.plot([0, 1], [i, i], label=label)[0] for i, label in enumerate(labels)]
    columns, rows = legend_grid(labels, figure.get_figwidth())
    legend = figure.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    figure.canvas.draw()
    box = legend.get_window_extent()
    assert 0 <= box.x0 and box.x1 <= figure.bbox.width
    assert rows == -(-n_labels // columns)
    plt.close(figure)
