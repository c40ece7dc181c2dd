"""Recipe files as they arrive: encodings, size, alias expansion, numbers in exponent form."""

from __future__ import annotations

import textwrap
import time

import pytest

from grnx_core.cli import main
from grnx_core.errors import RecipeError
from grnx_core.recipe import MAX_RECIPE_BYTES, load_recipe

from .test_bad_recipes import CORPUS

RECIPE = textwrap.dedent("""
    schema_version: 1
    name: encoded
    description: "café, naïve, Ωmega"
    data: {name: scanpy_builtin, params: {dataset: krumsiek11}}
    extractors: [{name: pearson, params: {top_k: 7}}]
""")


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
def test_a_recipe_with_a_byte_order_mark_reads_like_utf8(tmp_path, encoding):
    path = tmp_path / "r.yaml"
    data = RECIPE.encode(encoding)
    if encoding == "utf-16-be":  # Python writes no mark for an explicit byte order
        data = b"\xfe\xff" + data
    path.write_bytes(data)
    resolved = load_recipe(path)
    assert resolved.recipe.description == "café, naïve, Ωmega"
    assert resolved.steps_of("extractors")[0].params.top_k == 7
    assert resolved.source is not None and resolved.source.given_text.startswith("\nschema_version: 1")


def test_a_recipe_larger_than_the_bound_is_refused_before_it_is_parsed(tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    path.write_bytes(RECIPE.encode() + b"#" * MAX_RECIPE_BYTES)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "huge.yaml: the file is larger than 1 MiB" in err
    assert "Check that this is the recipe and not a data file." in err and "Traceback" not in err


def test_an_alias_bomb_is_refused_quickly(capsys):
    # Before the bound, this 700-byte file ran `grnx validate` for 106 s and then out of memory.
    started = time.perf_counter()
    assert main(["validate", str(CORPUS / "43_alias_bomb.yaml")]) == 2
    assert time.perf_counter() - started < 5
    assert "expands to more than 100,000 values" in capsys.readouterr().err


def test_aliases_within_the_bound_still_work(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        RECIPE
        + textwrap.dedent("""
        evaluators:
          - {name: auprc, params: {ground_truth: &truth {source: data}}}
          - {name: nes, params: {ground_truth: *truth, permutations: 100}}
    """)
    )
    resolved = load_recipe(path)
    assert [s.params.ground_truth.source for s in resolved.steps_of("evaluators")] == ["data", "data"]


def test_numbers_in_exponent_form_are_numbers(tmp_path):
    # YAML 1.2 reads 1e3 as a number; PyYAML (YAML 1.1) reads it as a string.
    path = tmp_path / "r.yaml"
    path.write_text(
        RECIPE.replace("top_k: 7", "top_k: 1e3") + "train: {learning_rate: 2.5E-4, weight_decay: 1e-2}\n"
    )
    resolved = load_recipe(path)
    assert resolved.steps_of("extractors")[0].params.top_k == 1000
    assert resolved.recipe.train.learning_rate == pytest.approx(2.5e-4)
    assert resolved.recipe.train.weight_decay == pytest.approx(0.01)


def test_seeds_are_not_bounded_like_sizes(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE + f"seed: {2**50}\n")
    assert load_recipe(path).recipe.seed == 2**50


def test_every_impossible_size_is_reported_at_once(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.replace("top_k: 7", "top_k: 1e13") + "train: {epochs: 1e15}\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    paths = [problem.path for problem in error.value.problems]
    assert paths == ["extractors.0.params.top_k", "train.epochs"]
