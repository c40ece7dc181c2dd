"""The model recipes validate, and the CelluFormer one runs end to end (scaled down)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from grnx_core.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[3] / "recipes"


@pytest.mark.parametrize("name", ["wds/celluformer_train.yaml", "thesis/geneformer_celltype.yaml"])
def test_recipe_validates(name, monkeypatch):
    import re

    recipe = RECIPES / name
    root = RECIPES.parent
    missing = [
        p
        for p in re.findall(r"^# Requires: (\S+)", recipe.read_text(), flags=re.M)
        if not (root / p).exists()
    ]
    if missing:
        pytest.skip(f"needs {missing[0]}, which is not on this machine")
    monkeypatch.chdir(root)  # the recipes' relative paths start at the repository root
    resolved = load_recipe(recipe)
    assert resolved.step("model") is not None


def test_celluformer_recipe_runs_end_to_end(tmp_path):
    from grnx_core.cache import Cache
    from grnx_core.runner import run_recipe

    overrides = [
        "data.params.n_cells=240",
        "data.params.n_genes=30",
        "data.params.n_regulators=6",
        "data.params.n_rewired=3",
        "data.params.n_gained=3",
        "sampler.params.fraction=0.5",
        "sampler.params.n_hashes=20",
        "tokenizer.params.max_length=24",
        "model.params.d_model=16",
        "model.params.n_heads=2",
        "model.params.d_ff=32",
        "model.params.n_layers=1",
        "train.epochs=2",
        "evaluators.3.params.permutations=20",
        "evaluators.4.params.permutations=20",
    ]
    resolved = load_recipe(RECIPES / "wds/celluformer_train.yaml", overrides)
    result = run_recipe(resolved, track=False, cache=Cache(tmp_path / "cache"))
    assert result.status == "FINISHED"
    context = result.context
    attention = result.interactions["attention_all"]
    assert len(attention) > 0 and set(attention.genes) <= set(context.adata.var_names)
    assert np.all(np.diff(attention.table["score"].to_numpy()) <= 0)
    assert "attention_disease_minus_control" in result.interactions
    assert "eval/classification/accuracy" in result.metrics
    # the runner tokenized the sampled cells: the extractor used their WDS weights
    assert context.tokens.n_cells == context.sample.n_cells


@pytest.mark.shared_data
def test_geneformer_recipe_runs_end_to_end(tmp_path, shared_data):
    from grnx_core.cache import Cache
    from grnx_core.runner import run_recipe

    overrides = [
        "tokenizer.params.model_input_size=32",
        "model.params.max_positions=32",
        "model.params.n_layers=1",
        "model.params.hidden_size=16",
        "model.params.n_heads=2",
        "model.params.intermediate_size=32",
        "train.epochs=1",
        "train.warmup_steps=0",
    ]
    resolved = load_recipe(RECIPES / "thesis/geneformer_celltype.yaml", overrides)
    result = run_recipe(resolved, track=False, cache=Cache(tmp_path / "cache"))
    assert result.status == "FINISHED"
    context = result.context
    assert context.tokens.vocabulary[0] == "<pad>" and context.tokens.lengths.max() <= 32
    assert len(context.model.classes_) == 10  # pbmc68k_reduced's bulk_labels
    assert 0.0 <= result.metrics["eval/classification/accuracy"] <= 1.0
    embeddings = context.model.embed(context.tokens.subset(np.arange(5)))
    assert embeddings.shape == (5, 16) and np.isfinite(embeddings).all()
