"""A separately packaged plugin, found through its own entry point with no change to grnx."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

from grnx_core import registry as registry_module
from grnx_core.cli import main

PLUGIN_MODULE = '''
"""A third-party grnx plugin: pairs ranked by negative Pearson correlation."""
from grnx_core import ComponentParams, Extractor, Interactions, hookimpl


class AntiCorrelation(Extractor):
    name = "anti_correlation"
    description = "Pairs ranked by negative Pearson correlation (third-party test plugin)."
    reference = "https://doi.org/10.1098/rspl.1895.0041"

    class Params(ComponentParams):
        pass

    def extract(self, context):
        from grnx_plugins.extractors.pearson import correlation_matrix

        adata, _ = context.sampled_adata()
        return Interactions.from_matrix(
            -correlation_matrix(adata.X), list(adata.var_names), directed=False, extractor=self.name
        )


@hookimpl
def grnx_register_extractors(register):
    register(AntiCorrelation)
'''


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """Lay out a distribution as pip would (module + dist-info with entry_points.txt) on sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "grnx_anticorr.py").write_text(PLUGIN_MODULE)
    dist_info = site / "grnx_anticorr-0.3.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: grnx-anticorr\nVersion: 0.3.0\n")
    (dist_info / "entry_points.txt").write_text("[grnx]\nanticorr = grnx_anticorr\n")
    monkeypatch.syspath_prepend(str(site))
    registry_module.reset_default_registry()
    yield site
    registry_module.reset_default_registry()
    sys.modules.pop("grnx_anticorr", None)


def test_listed_by_grnx_plugins(installed_plugin, capsys):
    assert main(["plugins", "extractor"]) == 0
    out = capsys.readouterr().out
    assert "anti_correlation: Pairs ranked by negative Pearson correlation" in out
    assert "[anticorr 0.3.0]" in out


def test_usable_from_a_recipe(installed_plugin, tmp_path, capsys):
    recipe = tmp_path / "third_party.yaml"
    recipe.write_text(
        textwrap.dedent("""
        schema_version: 1
        name: third_party
        data: {name: scanpy_builtin, params: {dataset: krumsiek11}}
        extractors: [{name: anti_correlation}, {name: pearson, params: {rank_by: value}}]
    """)
    )
    from grnx_core.recipe import load_recipe
    from grnx_core.runner import run_recipe

    result = run_recipe(load_recipe(recipe), track=False)
    anti = result.interactions["anti_correlation"].table
    pearson = result.interactions["pearson"].table
    # The most anti-correlated pair is the last Pearson pair, with the opposite score.
    assert set(anti.iloc[0][["source", "target"]]) == set(pearson.iloc[-1][["source", "target"]])
    assert np.isclose(anti.iloc[0]["score"], -pearson.iloc[-1]["score"])


def test_a_plugin_that_fails_to_import_is_reported(tmp_path, monkeypatch, capsys):
    site = tmp_path / "site"
    dist_info = site / "grnx_broken-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: grnx-broken\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[grnx]\nbroken = grnx_broken_missing_module\n")
    monkeypatch.syspath_prepend(str(site))
    registry_module.reset_default_registry()
    try:
        assert main(["plugins"]) == 0
        captured = capsys.readouterr()
        assert "plugin 'broken' failed to load: ModuleNotFoundError" in captured.err
        assert "pearson" in captured.out  # the other plugins still load
    finally:
        registry_module.reset_default_registry()
