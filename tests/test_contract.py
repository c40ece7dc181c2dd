"""The contract suite: every registered component, built-in or not, keeps the component contract."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
from pydantic import ValidationError

from grnx_core.components import (
    KIND_BASES,
    ComponentParams,
    Evaluator,
    Kind,
    Preprocessor,
    constructor_fields,
)
from grnx_core.registry import Registry

REGISTRY = Registry.from_entry_points()
ENTRIES = [entry for kind in Kind for entry in REGISTRY.entries[kind].values()]


def test_every_plugin_loads():
    assert REGISTRY.problems() == []


@pytest.mark.parametrize("entry", ENTRIES, ids=[f"{e.kind.value}:{e.name}" for e in ENTRIES])
def test_component_contract(entry):
    cls = entry.load()
    assert issubclass(cls, KIND_BASES[entry.kind])
    assert cls.name == entry.name
    assert cls.description and "\n" not in cls.description, "description must be one line"
    assert cls.reference.startswith(("http://", "https://")), "reference must be a DOI or URL"
    assert issubclass(cls.Params, ComponentParams)
    assert cls.Params.model_config.get("extra") == "forbid"
    for field_name, info in cls.Params.model_fields.items():
        assert info.description, f"{entry.name}.Params.{field_name} has no description"
    explicit = constructor_fields(cls)
    if explicit is not None:
        assert explicit == set(cls.Params.model_fields), "the constructor must take exactly the Params fields"
        for parameter in list(inspect.signature(cls.__init__).parameters.values())[1:]:
            assert parameter.kind is inspect.Parameter.KEYWORD_ONLY
    try:
        defaults = cls.Params()
    except ValidationError:
        defaults = None  # some fields are required, alone or in combination
    if defaults is not None:
        component = cls.from_params(defaults)
        for field_name in cls.Params.model_fields:
            assert getattr(component, field_name) == getattr(defaults, field_name)
    if issubclass(cls, Evaluator):
        assert cls.higher_is_better, "an evaluator must declare higher_is_better for its metrics"
    if issubclass(cls, Preprocessor):
        assert cls.writes, "a preprocessor must declare the keys it writes"
    # The method the kind needs is implemented, not inherited from the base.
    method = {
        Kind.DATA: "load", Kind.PREPROCESSOR: "__call__", Kind.SAMPLER: "sample", Kind.TOKENIZER: "transform",
        Kind.MODEL: "fit", Kind.EXTRACTOR: "extract", Kind.EVALUATOR: "evaluate",
    }[entry.kind]
    assert getattr(cls, method) is not getattr(KIND_BASES[entry.kind], method)


def test_listing_plugins_does_not_import_torch():
    code = (
        "import sys\n"
        "from grnx_core.cli import main\n"
        "main(['plugins', 'model'])\n"
        "main(['plugins', 'extractor'])\n"
        "assert 'torch' not in sys.modules, 'a component module imports torch at import time'\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
