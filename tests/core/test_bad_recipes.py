"""Every recipe in the bad-recipe corpus gets a short, specific error and exit code 2."""

from __future__ import annotations

import codecs
import re
from pathlib import Path

import pytest

from grnx_core.cli import main

CORPUS = Path(__file__).parent / "bad_recipes"
CASES = sorted(CORPUS.glob("*.yaml"))


def _text(path: Path) -> str:
    """The file as text whatever its encoding: some cases are UTF-16 or Latin-1 on purpose."""
    raw = path.read_bytes()
    for mark, codec in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16")):
        if raw.startswith(mark):
            return raw.decode(codec, errors="replace")
    return raw.decode("utf-8", errors="replace").replace("\x00", "")


def _header(path: Path, key: str) -> list[str]:
    pattern = re.compile(rf"^# {key}: (.*)$")
    return [m.group(1) for line in _text(path).splitlines() if (m := pattern.match(line))]


def test_corpus_is_large_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_bad_recipe_is_rejected_with_its_message(path, capsys):
    overrides = [o.strip() for line in _header(path, "overrides") for o in line.split(";")]
    expected = _header(path, "expect")
    assert expected, f"{path.name} has no '# expect:' line"
    argv = ["validate", str(path)]
    for override in overrides:
        argv += ["--set", override]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for fragment in expected:
        assert fragment in err, f"expected {fragment!r} in:\n{err}"


def test_missing_recipe_file(capsys, tmp_path):
    code = main(["validate", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "recipe file not found" in err and "Traceback" not in err


def test_run_with_bad_recipe_exits_2_without_traceback(capsys):
    code = main(["run", str(CORPUS / "11_unknown_extractor.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert "Did you mean 'pearson'?" in err and "Traceback" not in err


def test_debug_flag_shows_the_traceback(capsys):
    code = main(["--debug", "run", str(CORPUS / "11_unknown_extractor.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err
