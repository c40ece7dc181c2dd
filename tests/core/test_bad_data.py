"""Every case of the bad-data corpus (``bad_data/cases.py``) stops ``grnx run`` with exit 2, no
traceback and a message that says what to fix."""

from __future__ import annotations

import gzip

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
    code = main(["run", recipe.name, "--no-track", "--no-cache"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "bug in grnx" not in err, err
    for fragment in case.expect:
        assert fragment in err, f"expected {fragment!r} in:\n{err}"


def test_gzipped_ground_truth_named_tsv_is_read(tmp_path, monkeypatch, capsys):
    """Not an error: the file is read by its content, whatever its name."""
    (tmp_path / "beeline.tsv").write_bytes(gzip.compress(BEELINE.encode()))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"schema_version: 1\nname: gzip_truth\n{_ground_truth('beeline.tsv', 'beeline')}\n")
    monkeypatch.chdir(tmp_path)
    code = main(["run", recipe.name, "--no-track", "--no-cache"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
