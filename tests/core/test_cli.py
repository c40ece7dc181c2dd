"""The grnx command, in-process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import yaml

from grnx_core.cli import build_parser, main

RECIPE = """
schema_version: 1
name: cli
data: {name: scanpy_builtin, params: {dataset: krumsiek11}}
extractors: [{name: pearson}]
"""


def test_plugins_lists_every_kind(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for heading in (
        "data sources",
        "preprocessors",
        "samplers",
        "tokenizers",
        "models",
        "extractors",
        "evaluators",
    ):
        assert heading in out
    assert "pearson: Gene pairs ranked by Pearson co-expression" in out


def test_plugins_of_a_kind_shows_params_with_defaults_and_descriptions(capsys):
    assert main(["plugins", "extractor", "pearson"]) == 0
    out = capsys.readouterr().out
    assert "reference: https://doi.org/" in out
    assert "rank_by (Literal['abs', 'value'], default 'abs'): rank pairs by |score|" in out


def test_plugins_unknown_name(capsys):
    assert main(["plugins", "extractor", "pearsn"]) == 2
    assert "Did you mean 'pearson'?" in capsys.readouterr().err


def test_show_prints_the_resolved_recipe_with_overrides(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(RECIPE))
    assert main(["show", str(path), "seed=5", "extractors.0.params.rank_by=value"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["seed"] == 5
    assert shown["extractors"][0]["params"]["rank_by"] == "value"
    assert shown["train"]["epochs"] == 3  # defaults are filled in


def test_validate_a_folder(tmp_path, capsys):
    (tmp_path / "good.yaml").write_text(textwrap.dedent(RECIPE))
    (tmp_path / "bad.yaml").write_text(textwrap.dedent(RECIPE).replace("pearson", "pearsn"))
    assert main(["validate", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert f"ok: {tmp_path / 'good.yaml'}" in captured.out
    assert f"invalid: {tmp_path / 'bad.yaml'}" in captured.err


def test_run_untracked_prints_the_top_pairs_when_verbose(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(RECIPE))
    assert main(["run", str(path), "--no-track", "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert "run (not tracked): FINISHED" in out and "pearson: 55 pairs; top:" not in out
    assert "stages: " in out and "(--verbose lists every metric)" in out
    assert main(["run", str(path), "--no-track", "--no-cache", "--verbose"]) == 0
    assert "pearson: 55 pairs; top:" in capsys.readouterr().out


def test_run_summary_has_a_row_per_extractor_and_the_headline_metrics(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(
        textwrap.dedent(RECIPE)
        + textwrap.dedent("""
        evaluators:
          - {name: auprc, params: {ground_truth: {source: data}}}
          - {name: nes, params: {ground_truth: {source: data}, permutations: 100}}
    """)
    )
    assert main(["run", str(path), "--no-track"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.strip().startswith("extractor"))
    assert header.split() == ["extractor", "AUPRC/rand", "EPR", "NES", "p"]
    row = next(line for line in lines if line.strip().startswith("pearson"))
    assert len(row.split()) == 5 and all(cell != "-" for cell in row.split())


def test_missing_data_file_is_a_user_error(tmp_path, capsys, monkeypatch):
    from grnx_plugins.extractors import pearson

    def missing(self, context):
        raise FileNotFoundError(2, "No such file or directory", "ground_truth.tsv")

    monkeypatch.setattr(pearson.PearsonExtractor, "extract", missing)
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(RECIPE))
    assert main(["run", str(path), "--no-track", "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert "No such file or directory: 'ground_truth.tsv'" in err and "Traceback" not in err


def test_ui_binds_to_localhost_by_default():
    args = build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1"


def test_console_script_is_installed(tmp_path):
    """The ``grnx`` executable the install puts beside this Python runs, and passes exit statuses on."""
    import importlib.metadata
    import shutil
    from pathlib import Path

    scripts = Path(sys.executable).parent
    grnx = shutil.which("grnx", path=str(scripts))
    assert grnx is not None, f"no grnx console script in {scripts}; install grnx (pip install -e .)"
    completed = subprocess.run([grnx, "--version"], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == f"grnx {importlib.metadata.version('grnx')}"
    missing = subprocess.run([grnx, "validate", "missing.yaml"], capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "recipe file not found: missing.yaml" in missing.stdout + missing.stderr
