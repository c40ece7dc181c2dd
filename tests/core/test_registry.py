"""The registry: lazy registration, lookups with suggestions, conflicts, broken plugins."""

from __future__ import annotations

import sys
import types

import pytest
from pydantic import Field

from grnx_core import ComponentParams, Extractor, Interactions, Kind, PluginError, hookimpl
from grnx_core.registry import Registry


class AntiCorrelation(Extractor):
    name = "anti_correlation"
    description = "Pairs ranked by negative Pearson correlation."
    reference = "https://doi.org/10.1098/rspl.1895.0041"

    class Params(ComponentParams):
        top_k: int | None = Field(None, description="keep the best pairs only")

    def extract(self, context):
        from grnx_plugins.extractors.pearson import correlation_matrix

        adata, _ = context.sampled_adata()
        return Interactions.from_matrix(
            -correlation_matrix(adata.X),
            list(adata.var_names),
            directed=False,
            extractor=self.name,
            top_k=self.top_k,
        )


def _plugin(**hooks):
    module = types.ModuleType("a_test_plugin")
    for name, function in hooks.items():
        setattr(module, name, hookimpl(function))
    return module


def test_eager_and_lazy_registration():
    registry = Registry()

    def grnx_register_extractors(register):
        register(AntiCorrelation)
        register("pearson_lazy_alias", "grnx_plugins.extractors.pearson:PearsonExtractor")

    registry.add_plugin(_plugin(grnx_register_extractors=grnx_register_extractors), "test", "1.0")
    assert registry.names(Kind.EXTRACTOR) == ["anti_correlation", "pearson_lazy_alias"]
    assert registry.get(Kind.EXTRACTOR, "anti_correlation") is AntiCorrelation
    # The lazy target's class says its name is "pearson", so the alias is refused on load.
    with pytest.raises(PluginError, match="says its name is 'pearson'"):
        registry.get(Kind.EXTRACTOR, "pearson_lazy_alias")


def test_lazy_registration_does_not_import(monkeypatch):
    registry = Registry()
    monkeypatch.delitem(sys.modules, "grnx_test_never_imported", raising=False)

    def grnx_register_models(register):
        register("ghost", "grnx_test_never_imported:Ghost")

    registry.add_plugin(_plugin(grnx_register_models=grnx_register_models), "lazy", "1.0")
    assert registry.names(Kind.MODEL) == ["ghost"]
    assert "grnx_test_never_imported" not in sys.modules
    with pytest.raises(PluginError, match="failed to import.*grnx_test_never_imported:Ghost"):
        registry.get(Kind.MODEL, "ghost")


def test_unknown_name_suggests_the_closest():
    registry = Registry()
    registry.add_plugin(_plugin(grnx_register_extractors=lambda register: register(AntiCorrelation)), "t")
    with pytest.raises(PluginError) as error:
        registry.get(Kind.EXTRACTOR, "anti_corelation", where="extractors.0.name")
    message = str(error.value)
    assert "Unknown extractor 'anti_corelation' at extractors.0.name." in message
    assert "Did you mean 'anti_correlation'?" in message
    assert "Installed: anti_correlation" in message


def test_two_plugins_claiming_one_name_is_an_error_naming_both():
    registry = Registry()
    registry.add_plugin(_plugin(grnx_register_extractors=lambda register: register(AntiCorrelation)), "first")

    class Impostor(AntiCorrelation):
        pass

    registry.add_plugin(_plugin(grnx_register_extractors=lambda register: register(Impostor)), "second")
    with pytest.raises(PluginError) as error:
        registry.get(Kind.EXTRACTOR, "anti_correlation")
    assert "'first'" in str(error.value) and "'second'" in str(error.value)
    assert any("claimed by several plugins" in line for line in registry.problems())


def test_a_hook_that_raises_is_reported_not_dropped_silently():
    registry = Registry()

    def grnx_register_extractors(register):
        raise RuntimeError("boom")

    registry.add_plugin(_plugin(grnx_register_extractors=grnx_register_extractors), "broken")
    assert registry.problems() == [
        "plugin 'broken' failed to load: grnx_register_extractors raised RuntimeError: boom"
    ]


def test_registering_a_non_component_is_refused_on_load():
    registry = Registry()

    class NotAComponent:
        name = "fake"

    registry.add_plugin(_plugin(grnx_register_extractors=lambda register: register(NotAComponent)), "bad")
    with pytest.raises(PluginError, match="not a subclass of grnx_core.Extractor"):
        registry.get(Kind.EXTRACTOR, "fake")


def test_builtins_come_through_entry_points():
    registry = Registry.from_entry_points()
    assert "pearson" in registry.names(Kind.EXTRACTOR)
    assert registry.entry(Kind.EXTRACTOR, "pearson").plugin == "grnx.extractors"
    assert registry.entry(Kind.DATA, "scanpy_builtin").plugin == "grnx.data"
