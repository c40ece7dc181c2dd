"""Every case of the bad-data corpus (``bad_data/cases.py``) stops ``grnx run`` with exit 2, no
traceback and a message that says what to fix."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from grnx_core.cli import main

from .bad_data.cases import BEELINE, CASES, _ground_truth


def test_corpus_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 15


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_data_is_refused_with_what_to_fix(case, tmp_path, monkeypatch, capsys):
    recipe = case.write(tmp_path)
    monkeypatch.chdir(tmp_path)  # recipes name their files relative to where grnx runs
    with warnings.catch_warnings(record=True) as caught:  # what the terminal would show
        warnings.simplefilter("always")
        code = main(["run", recipe.name, "--no-track", "--no-cache"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "bug in grnx" not in err, err
    for fragment in case.expect:
        assert fragment in err, f"expected {fragment!r} in:\n{err}"
    # only the clear error: no numpy RuntimeWarning from the checks, no library warning about
    # what grnx refuses anyway (repeated names)
    assert [f"{w.category.__name__}: {w.message}" for w in caught if _printed_before_refusal(w)] == []


def _printed_before_refusal(warning: warnings.WarningMessage) -> bool:
    return issubclass(warning.category, RuntimeWarning) or "names are not unique" in str(warning.message)


def test_the_grnx_command_prints_no_runtime_warning(tmp_path):
    """The same through the installed command, for infinite counts: its stderr, as a user sees it."""
    (case,) = [case for case in CASES if case.id == "csv_infinite_count"]
    recipe = case.write(tmp_path)
    grnx = shutil.which("grnx", path=str(Path(sys.executable).parent))
    assert grnx is not None, "the grnx console script is not installed beside this Python"
    completed = subprocess.run(
        [grnx, "run", recipe.name, "--no-track", "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "default"},  # show every warning once, as Python does
        timeout=300,
    )
    assert completed.returncode == 2, completed.stderr
    assert "RuntimeWarning" not in completed.stderr and "Traceback" not in completed.stderr, completed.stderr
    assert all(fragment in completed.stderr for fragment in case.expect), completed.stderr


def test_gzipped_ground_truth_named_tsv_is_read(tmp_path, monkeypatch, capsys):
    """Not an error: the file is read by its content, whatever its name."""
    (tmp_path / "beeline.tsv").write_bytes(gzip.compress(BEELINE.encode()))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"schema_version: 1\nname: gzip_truth\n{_ground_truth('beeline.tsv', 'beeline')}\n")
    monkeypatch.chdir(tmp_path)
    code = main(["run", recipe.name, "--no-track", "--no-cache"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
