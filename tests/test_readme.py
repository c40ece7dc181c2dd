"""The README stays true: its hook table matches the hook specs, its commands match CI."""

from __future__ import annotations

import re
from pathlib import Path

from grnx_core.hookspecs import hook_signatures

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_hook_is_documented_with_its_signature():
    documented = dict(re.findall(r"^\| `(grnx_\w+)\(([^)]*)\)` \|", README, flags=re.M))
    specs = hook_signatures()
    assert set(documented) == set(specs)
    for name, signature in specs.items():
        assert documented[name].split(", ") == list(signature.parameters), name


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    test_command = commands[1]
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_every_recipe_the_readme_mentions_exists():
    for name in set(re.findall(r"recipes/[\w/]+\.yaml", README)):
        assert (ROOT / name).exists(), name
