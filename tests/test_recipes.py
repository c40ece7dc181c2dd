"""Every recipe in recipes/ validates and says how to run it; the index lists every recipe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from grnx_core.errors import RecipeError
from grnx_core.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def _requires(path: Path) -> list[Path]:
    """Paths named in '# Requires: path' header lines, relative to the repository root."""
    found = re.findall(r"^# Requires: (\S+)", path.read_text(), flags=re.M)
    return [ROOT / p for p in found]


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_recipe_validates(path, monkeypatch):
    missing = [p for p in _requires(path) if not p.exists()]
    if missing:
        pytest.skip(f"needs {missing[0]}, which is not on this machine")
    monkeypatch.chdir(ROOT)  # relative paths in recipes are relative to the repository root
    try:
        load_recipe(path)
    except RecipeError as error:
        pytest.fail(str(error))


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_recipe_header_gives_run_and_override_commands(path):
    text = path.read_text()
    relative = path.relative_to(ROOT)
    assert f"# Run:      grnx run {relative}" in text or f"# Run: grnx run {relative}" in text
    assert "# Override:" in text


def test_index_lists_every_recipe():
    index = (ROOT / "recipes" / "README.md").read_text()
    for path in RECIPES:
        assert str(path.relative_to(ROOT / "recipes")) in index, (
            f"recipes/README.md does not list {path.name}"
        )
