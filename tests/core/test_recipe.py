"""Recipe loading: extends, overrides, defaults, flattening, YAML safety."""

from __future__ import annotations

import textwrap

import pytest

from grnx_core.errors import RecipeError
from grnx_core.recipe import apply_override, flatten, load_recipe, load_recipe_data, parse_override

BASE = """
schema_version: 1
name: base
seed: 1
data: {name: scanpy_builtin, params: {dataset: krumsiek11}}
extractors: [{name: pearson, params: {rank_by: value}}]
train: {epochs: 5, batch_size: 8}
"""


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_extends_merges_mappings_and_replaces_lists(tmp_path):
    _write(tmp_path, "base.yaml", BASE)
    child = _write(
        tmp_path,
        "child.yaml",
        """
        extends: base.yaml
        name: child
        train: {epochs: 2}
        extractors: [{name: spearman}]
    """,
    )
    recipe = load_recipe(child).recipe
    assert recipe.name == "child" and recipe.seed == 1
    assert recipe.train.epochs == 2 and recipe.train.batch_size == 8
    assert [e.name for e in recipe.extractors] == ["spearman"]


def test_overrides_parse_values_as_yaml(tmp_path):
    path = _write(tmp_path, "base.yaml", BASE)
    resolved = load_recipe(
        path,
        [
            "seed=7",
            "train.learning_rate=0.00001",
            "extractors.0.params.top_k=10",
            "train.scheduler=cosine",
            "tracking.tags.owner=me",
        ],
    )
    recipe = resolved.recipe
    assert recipe.seed == 7 and recipe.train.learning_rate == pytest.approx(1e-5)
    assert recipe.train.scheduler == "cosine" and recipe.tracking.tags == {"owner": "me"}
    assert resolved.steps_of("extractors")[0].params.top_k == 10


def test_scientific_notation_strings_are_coerced(tmp_path):
    # PyYAML reads 1e-5 as a string; the schema turns it into a number.
    path = _write(tmp_path, "r.yaml", BASE.replace("epochs: 5", "epochs: 5, learning_rate: 1e-5"))
    assert load_recipe(path).recipe.train.learning_rate == pytest.approx(1e-5)


def test_resolved_recipe_fills_defaults_and_every_key_is_an_override_path(tmp_path):
    path = _write(tmp_path, "base.yaml", BASE)
    resolved = load_recipe(path)
    as_dict = resolved.to_dict()
    # every parameter pearson declares, at its declared default unless the recipe set it
    from grnx_plugins.extractors.pearson import PearsonExtractor

    declared = {
        name: field.get_default(call_default_factory=True)
        for name, field in PearsonExtractor.Params.model_fields.items()
    }
    params = as_dict["extractors"][0]["params"]
    assert params == {**declared, "rank_by": "value"}
    assert params["rank_by"] == "value" and params["group_key"] is None and params["top_k"] is None
    flat = flatten(as_dict)
    assert flat["extractors.0.params.rank_by"] == "value"
    # Applying every flattened key back as an override reproduces the same resolved recipe.
    data = load_recipe_data(path).data
    for key, value in flat.items():
        apply_override(data, key.split("."), value)
    from grnx_core.recipe import LoadedRecipe, Origins, validate_recipe
    from grnx_core.registry import default_registry

    again = validate_recipe(LoadedRecipe(path, data, "", [], Origins()), default_registry())
    assert again.to_dict() == as_dict


def test_show_output_is_valid_yaml_that_loads_again(tmp_path):
    path = _write(tmp_path, "base.yaml", BASE)
    shown = _write(tmp_path, "shown.yaml", load_recipe(path, ["seed=4"]).to_yaml())
    assert load_recipe(shown).to_dict() == load_recipe(path, ["seed=4"]).to_dict()


def test_problems_name_the_line_and_the_override(tmp_path):
    path = _write(tmp_path, "r.yaml", BASE)
    with pytest.raises(RecipeError) as error:
        load_recipe(path, ["train.epochs=0"])
    assert str(error.value) == (
        "override 'train.epochs=0': train.epochs: input should be greater than or equal to 1, got 0."
    )
    bad = _write(tmp_path, "bad.yaml", BASE.replace("seed: 1", "seed: x"))
    with pytest.raises(RecipeError) as error:
        load_recipe(bad)
    # the file and line of the bad value, its path, and the value found
    message = str(error.value)
    assert message.startswith(f"{bad}:4: seed: input should be a valid integer"), message
    assert message.endswith("got 'x'."), message


@pytest.mark.parametrize(
    "text,message",
    [
        ("seed", "expected KEY.PATH=VALUE"),
        ("=1", "is not a dotted path"),
        ("a..b=1", "is not a dotted path"),
    ],
)
def test_parse_override_rejects_malformed(text, message):
    with pytest.raises(ValueError, match=message):
        parse_override(text)


def test_yaml_python_tags_are_refused(tmp_path):
    path = _write(
        tmp_path, "evil.yaml", BASE.replace("name: base", "name: !!python/object/apply:os.getcwd []")
    )
    with pytest.raises(RecipeError, match="could not determine a constructor"):
        load_recipe(path)


def test_extends_replaces_a_section_that_names_another_component(tmp_path):
    _write(
        tmp_path,
        "base.yaml",
        """
        schema_version: 1
        name: base
        data: {name: csv, params: {path: counts.csv, orientation: genes_x_cells, values: counts}}
        model: {name: celluformer, params: {d_model: 16}}
        extractors: [{name: pearson}]
    """,
    )
    child = _write(
        tmp_path,
        "child.yaml",
        """
        extends: base.yaml
        name: child
        data: {name: h5ad, params: {path: data.h5ad}}
        model: {params: {d_model: 32}}
    """,
    )
    data = load_recipe_data(child).data
    # another data source: the csv params (orientation, values) would mean nothing to h5ad
    assert data["data"] == {"name": "h5ad", "params": {"path": "data.h5ad"}}
    # the same model named (or not named) again: its params still merge
    assert data["model"] == {"name": "celluformer", "params": {"d_model": 32}}
