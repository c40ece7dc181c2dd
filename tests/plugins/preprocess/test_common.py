"""Seeds and data roles across the built-in preprocessors: which params the recipe fills, and how."""

from __future__ import annotations

import importlib

import pytest

from grnx_plugins.preprocess import COMPONENTS
from grnx_plugins.preprocess._common import seed_or_zero


def load(target: str) -> type:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


CLASSES = {name: load(target) for name, target in COMPONENTS.items()}

#: (preprocessor, param) -> the data role it defaults to. Optional params whose None means "do not
#: use this column" (split.label_key: no stratification; balance.cell_type_key: one stratum;
#: highly_variable_genes.batch_key: no batch-aware ranking) stay plain: a role default would change
#: the results of recipes that set the data role without meaning to turn these on.
ROLE_PARAMS = {
    ("split", "donor_key"): "donor_key",
    ("balance", "label_key"): "label_key",
    ("scrublet", "batch_key"): "batch_key",
}


def test_role_params_are_exactly_the_decided_ones():
    found = {
        (name, field): (info.json_schema_extra or {}).get("grnx_role")
        for name, cls in CLASSES.items()
        for field, info in cls.Params.model_fields.items()
        if (info.json_schema_extra or {}).get("grnx_role")
    }
    assert found == ROLE_PARAMS
    for name, field in ROLE_PARAMS:
        assert CLASSES[name].Params.model_fields[field].default is None


@pytest.mark.parametrize("name", [n for n, cls in CLASSES.items() if "seed" in cls.Params.model_fields])
def test_every_seed_defaults_to_the_recipe_seed(name):
    info = CLASSES[name].Params.model_fields["seed"]
    assert info.default is None and "derived from the recipe seed" in info.description


def test_seeded_preprocessors_are_the_random_ones():
    seeded = {n for n, cls in CLASSES.items() if "seed" in cls.Params.model_fields}
    assert seeded == {"split", "balance", "scrublet", "pca", "neighbors", "leiden", "umap"}


def test_seed_or_zero():
    assert seed_or_zero(None) == 0 and seed_or_zero(0) == 0 and seed_or_zero(7) == 7
