"""The engine: cell sets, a model trained once across repeats, code-aware cache keys, seeds, sweeps,
runs that read no matrix when cached, and cached stages logged like computed ones."""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
import types

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from grnx_core import hookimpl
from grnx_core.cache import Cache
from grnx_core.errors import RecipeError
from grnx_core.recipe import load_recipe
from grnx_core.runner import Runner
from grnx_core.tracking import Tracker

from .plugin_fixtures import CALLS, fixture_registry

SYNTHETIC = (
    "{name: synthetic, params: {n_cells: 240, n_genes: 20, n_regulators: 5, n_donors: 6, seed: 3}, "
    "label_key: disease, donor_key: donor}"
)

PROTOCOL = f"""
schema_version: 1
name: protocol
seed: 4
data: {SYNTHETIC}
preprocess: [{{name: split, params: {{test_fraction: 0.3}}}}]
sampler: {{name: stride, params: {{step: 4}}, repeats: 3}}
model: {{name: centroid, cells: train}}
extractors: [{{name: pearson}}]
evaluators: [{{name: top_pair_score}}, {{name: classification}}]
"""


def _write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _run(path, registry, cache, overrides=(), tracker=None):
    resolved = load_recipe(path, overrides, registry=registry)
    return Runner(resolved, cache=cache, plugin_manager=registry.plugin_manager, tracker=tracker).run()


def _stages(child):
    return {report.stage: report.cached for report in child.leaf.stages}


def test_model_trains_once_on_all_training_cells_while_each_repeat_samples(tmp_path):
    registry = fixture_registry()
    cache = Cache(tmp_path / "cache")
    path = _write(tmp_path, PROTOCOL)
    CALLS["centroid_fit"] = CALLS["centroid_predict"] = 0
    result = _run(path, registry, cache)
    assert CALLS["centroid_fit"] == 1, "the model does not read the sample: one fit for three repeats"
    repeats = [child for child in result.children if child.child.role == "repeat"]
    # the held-out classification reads no sample: computed once, logged by every repeat alike
    assert CALLS["centroid_predict"] == 1
    accuracies = {child.leaf.metrics["eval/classification/accuracy"] for child in repeats}
    assert len(accuracies) == 1
    assert [child.child.sampler_seed for child in repeats] == [4, 5, 6]
    assert [_stages(child)["model"] for child in repeats] == [False, True, True]
    assert [_stages(child)["extract:pearson"] for child in repeats] == [False, False, False]

    adata = result.context.adata
    train = list(adata.obs_names[adata.obs["split"] == "train"])
    model = repeats[0].leaf.context.model
    assert model.cells_ == train, "cells: train is every training cell, not the sample's"
    assert len(train) > len(repeats[0].sample.sample.indices)

    samples = []
    for child in repeats:
        sample = child.sample
        chosen = np.zeros(adata.n_obs, dtype=bool)
        chosen[sample.sample.indices] = True
        assert list(sample.obs.columns) == ["stride_chosen"], "each repeat owns the columns its sampler wrote"
        assert np.array_equal(sample.obs["stride_chosen"].to_numpy(), chosen)
        samples.append(sample.sample.indices)
    assert len({tuple(s) for s in samples}) > 1, "different sampler seeds draw different cells"
    assert "stride_chosen" not in adata.obs.columns, "the shared data is not changed by a sampler"

    CALLS.pop("centroid_device", None)
    rerun = _run(path, registry, cache)
    assert CALLS["centroid_fit"] == 1
    assert CALLS["centroid_device"] == "auto", "a cached model is placed on train.device"
    for first, again in zip(repeats, [c for c in rerun.children if c.child.role == "repeat"]):
        assert all(_stages(again).values()) or set(k for k, v in _stages(again).items() if not v) == {
            "evaluate:top_pair_score",
            "evaluate:classification",
        }
        assert np.array_equal(first.sample.sample.indices, again.sample.sample.indices)
        assert first.sample.obs.equals(again.sample.obs), "a cached repeat restores its own sample columns"
        assert first.leaf.metrics == again.leaf.metrics


def test_unmet_needs_and_cell_sets_are_reported_before_any_compute(tmp_path):
    registry = fixture_registry()
    path = _write(
        tmp_path,
        f"""
        schema_version: 1
        name: needs
        data: {SYNTHETIC}
        extractors: [{{name: attention}}, {{name: pearson, cells: sample}}]
        evaluators: [{{name: classification}}]
    """,
    )
    with pytest.raises(RecipeError) as error:
        load_recipe(path, registry=registry)
    message = str(error.value)
    assert "extractors.0: extractor 'attention' needs tokens" in message
    assert "extractor 'attention' needs model" in message
    assert "evaluators.0: evaluator 'classification' needs model" in message
    assert "extractors.1.cells: is 'sample', but the recipe has no sampler" in message


_PREPROCESSOR_SOURCE = '''
"""An edited-by-the-test preprocessor."""
import numpy as np
from grnx_core import ComponentParams, Preprocessor

class Shift(Preprocessor):
    name = "shift"
    description = "Add a constant."
    reference = "https://example.org/shift"
    writes = ("X",)

    class Params(ComponentParams):
        pass

    def __call__(self, adata):
        adata = adata.copy()
        adata.X = np.asarray(adata.X) + OFFSET
        return adata

OFFSET = 1.0
'''

_EXTRACTOR_SOURCE = '''
"""An edited-by-the-test extractor."""
import numpy as np
from grnx_core import ComponentParams, Extractor, Interactions

class Covariance(Extractor):
    name = "covariance"
    description = "Gene pairs by covariance."
    reference = "https://example.org/covariance"
    needs = ("data", "cells")

    class Params(ComponentParams):
        pass

    def extract(self, context):
        adata, _ = context.sampled_adata()
        matrix = np.cov(np.asarray(adata.X, dtype=float), rowvar=False) * SCALE
        return Interactions.from_matrix(matrix, list(adata.var_names), directed=False, extractor=self.name)

SCALE = 1.0
'''


def _edit_registry(tmp_path):
    """A registry with the two modules above, (re)imported from their current source."""
    registry = fixture_registry()
    for name in ("grnx_edit_pre", "grnx_edit_ext"):
        sys.modules.pop(name, None)
    pre, ext = importlib.import_module("grnx_edit_pre"), importlib.import_module("grnx_edit_ext")
    module = types.ModuleType("grnx_edit_plugin")
    module.grnx_register_preprocessors = hookimpl(lambda register: register(pre.Shift))
    module.grnx_register_extractors = hookimpl(lambda register: register(ext.Covariance))
    registry.add_plugin(module, "edit-tests", "0")
    return registry


def test_editing_a_component_source_invalidates_that_step_and_later_ones_only(tmp_path, monkeypatch):
    (tmp_path / "grnx_edit_pre.py").write_text(_PREPROCESSOR_SOURCE)
    (tmp_path / "grnx_edit_ext.py").write_text(_EXTRACTOR_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _write(
        tmp_path,
        """
        schema_version: 1
        name: edits
        data: {name: scanpy_builtin, params: {dataset: krumsiek11}}
        preprocess: [{name: shift}, {name: scale_genes}]
        extractors: [{name: covariance}]
    """,
    )
    cache = Cache(tmp_path / "cache")

    def cached():
        result = _run(path, _edit_registry(tmp_path), cache)
        return {report.stage: report.cached for report in result.stages}

    assert not any(cached().values())
    assert all(cached().values())
    # A change to the extractor's module: only the extraction reruns.
    (tmp_path / "grnx_edit_ext.py").write_text(_EXTRACTOR_SOURCE.replace("SCALE = 1.0", "SCALE = 2.0"))
    assert cached() == {
        "data": True,
        "preprocess:0:shift": True,
        "preprocess:1:scale_genes": True,
        "extract:covariance": False,
    }
    # A change to the first preprocessor: it and everything after it rerun, the data stage does not.
    (tmp_path / "grnx_edit_pre.py").write_text(_PREPROCESSOR_SOURCE.replace("OFFSET = 1.0", "OFFSET = 3.0"))
    assert cached() == {
        "data": True,
        "preprocess:0:shift": False,
        "preprocess:1:scale_genes": False,
        "extract:covariance": False,
    }


def test_recipe_seed_reaches_the_split_and_the_umap(tmp_path):
    registry = fixture_registry()
    path = _write(
        tmp_path,
        f"""
        schema_version: 1
        name: seeds
        data: {SYNTHETIC.replace("n_donors: 6", "n_donors: 12")}
        preprocess:
          - {{name: normalize_total, params: {{target_sum: 10000}}}}
          - {{name: log1p}}
          - {{name: pca, params: {{n_comps: 5}}}}
          - {{name: neighbors, params: {{n_neighbors: 10}}}}
          - {{name: umap, params: {{color_by: []}}}}
          - {{name: split, params: {{test_fraction: 0.3}}}}
    """,
    )

    def prepared(seed):
        resolved = load_recipe(path, [f"seed={seed}"], registry=registry)
        return Runner(resolved, cache=Cache(enabled=False)).run().context.adata

    zero, again, one = prepared(0), prepared(0), prepared(1)
    assert np.array_equal(zero.obsm["X_umap"], again.obsm["X_umap"])
    assert zero.obs["split"].equals(again.obs["split"])
    assert not np.allclose(zero.obsm["X_umap"], one.obsm["X_umap"]), "seed=1 must move the UMAP"
    assert not zero.obs["split"].equals(one.obs["split"]), "seed=1 must change the donor split"


def test_a_sweep_runs_every_point_as_a_child_with_group_aggregates_and_a_figure(tmp_path):
    registry = fixture_registry()
    path = _write(
        tmp_path,
        """
        schema_version: 1
        name: sweep
        data: {name: scanpy_builtin, params: {dataset: krumsiek11}}
        sampler: {name: stride, params: {step: 3}}
        extractors: [{name: pearson}]
        evaluators: [{name: top_pair_score}]
        tracking: {experiment: sweep-tests}
        sweep:
          grid:
            sampler.params.step: [3, 5]
            extractors.0.params.rank_by: [abs, value]
            seed: [0, 1]
          plot: {metric: eval/top_pair_score/pearson/top_score, x: sampler.params.step}
    """,
    )
    tracker = Tracker(os.environ["MLFLOW_TRACKING_URI"])
    result = _run(path, registry, Cache(tmp_path / "cache"), tracker=tracker)
    assert len(result.children) == 8 == len(result.child_run_ids)
    client = MlflowClient(tracker.tracking_uri)
    children = client.search_runs(
        [tracker.experiment_id("sweep-tests")], f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    assert len(children) == 8
    parent = client.get_run(result.run_id).data.metrics
    for child in result.children:
        values = child.child.resolved.recipe
        label = f"step_{values.sampler.params['step']}-rank_by_{values.extractors[0].params['rank_by']}-seed_{values.seed}"
        score = child.leaf.metrics["eval/top_pair_score/pearson/top_score"]
        assert parent[f"sweep/{label}/eval/top_pair_score/pearson/top_score.mean"] == pytest.approx(score)
        assert parent[f"sweep/{label}/eval/top_pair_score/pearson/top_score.n"] == 1
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "sweep")}
    assert "sweep/groups.csv" in artifacts
    assert "sweep/eval_top_pair_score_pearson_top_score_vs_sampler.params.step.png" in artifacts
    # Points that differ only by an extractor's params share the sample: it is computed once per seed and step.
    sampled = [report.cached for report in result.stages if report.stage == "sample"]
    assert sampled.count(False) == 4


def test_a_fully_cached_rerun_reads_no_matrix(tmp_path, monkeypatch):
    import anndata
    import scanpy as sc

    adata = sc.datasets.krumsiek11()
    adata.X = np.round(np.abs(adata.X) * 10)
    adata.uns.clear()  # krumsiek11's uns has integer keys, which h5ad cannot hold
    adata.obs_names_make_unique()
    adata.write_h5ad(tmp_path / "data.h5ad")
    registry = fixture_registry()
    path = _write(
        tmp_path,
        f"""
        schema_version: 1
        name: backed
        data: {{name: h5ad, params: {{path: {tmp_path / "data.h5ad"}, backed: false}}}}
        preprocess: [{{name: normalize_total, params: {{target_sum: 100}}}}]
        sampler: {{name: stride, params: {{step: 3}}}}
        extractors: [{{name: pearson}}]
        evaluators: [{{name: top_pair_score}}]
    """,
    )
    cache = Cache(tmp_path / "cache")
    cold = _run(path, registry, cache)

    def no_reading(*args, **kwargs):
        raise AssertionError(f"the cached rerun read an AnnData: {args}")

    monkeypatch.setattr(anndata, "read_h5ad", no_reading)
    warm = _run(path, registry, cache)
    assert warm.metrics == cold.metrics
    assert set(warm.cached_stages) == {"data", "preprocess:0:normalize_total", "sample", "extract:pearson"}


def test_a_cached_stage_logs_what_a_computed_one_logged(tmp_path):
    registry = fixture_registry()
    path = _write(
        tmp_path, PROTOCOL.replace("repeats: 3", "repeats: 1") + "tracking: {experiment: replay-tests}\n"
    )
    tracker = Tracker(os.environ["MLFLOW_TRACKING_URI"])
    cache = Cache(tmp_path / "cache")
    client = MlflowClient(tracker.tracking_uri)

    def logged(run_id):
        run = client.get_run(run_id)

        def walk(folder=None):
            for item in client.list_artifacts(run_id, folder):
                yield from walk(item.path) if item.is_dir else [item.path]

        history = client.get_metric_history(run_id, "train/n_cells")
        return run.data.metrics, sorted(walk()), [(m.step, m.value) for m in history]

    first = _run(path, registry, cache, tracker=tracker)
    second = _run(path, registry, cache, tracker=tracker)
    assert set(second.cached_stages) >= {"data", "preprocess:0:split", "sample", "model", "extract:pearson"}
    metrics_1, artifacts_1, curve_1 = logged(first.run_id)
    metrics_2, artifacts_2, curve_2 = logged(second.run_id)
    assert metrics_1 == metrics_2
    assert artifacts_1 == artifacts_2 and "model/centroid.json" in artifacts_1
    assert curve_1 == curve_2 and curve_1


def test_extractors_reach_models_only_through_grnx_core_contracts():
    from pathlib import Path

    extractors = Path(__file__).resolve().parents[2] / "plugins" / "extractors"
    for module in sorted(extractors.glob("*.py")):
        source = module.read_text()
        assert "grnx_plugins.models" not in source, f"{module.name} imports a model plugin's internals"


def test_attention_models_satisfy_the_attention_contract():
    from grnx_core import AttentionModel
    from grnx_plugins.models.celluformer import CelluFormer
    from grnx_plugins.models.mlp import MLP

    assert issubclass(CelluFormer, AttentionModel)
    assert not issubclass(MLP, AttentionModel)


def test_a_data_role_is_checked_even_when_the_data_stage_is_cached(tmp_path, monkeypatch):
    from grnx_core.errors import DataError, RecipeError
    from grnx_plugins.data.synthetic import Synthetic

    registry = fixture_registry()
    path = _write(
        tmp_path,
        f"""
        schema_version: 1
        name: roles
        data: {SYNTHETIC}
        extractors: [{{name: pearson}}]
    """,
    )
    cache = Cache(tmp_path / "cache")
    _run(path, registry, cache)
    # The synthetic source lists its columns, so validation refuses the role before any stage...
    with pytest.raises(
        RecipeError,
        match="obs column 'diagnosis' is not in the data.*columns: batch, cell_type, depth, disease",
    ):
        _run(path, registry, cache, overrides=["data.label_key=diagnosis"])
    # ...and for a source that cannot, the engine checks it even when the data comes from the cache.
    monkeypatch.setattr(Synthetic, "obs_columns", lambda self: None)
    with pytest.raises(DataError, match="data.label_key is 'diagnosis'.*Available: .*disease"):
        _run(path, registry, cache, overrides=["data.label_key=diagnosis"])


def test_a_run_that_fails_in_its_last_preprocess_step_keeps_the_earlier_steps(tmp_path):
    registry = fixture_registry()
    text = """
        schema_version: 1
        name: steps
        data: {name: scanpy_builtin, params: {dataset: krumsiek11}}
        preprocess: [{name: log1p, params: {}}, {name: scale_genes, params: {fail: FAIL}}]
        extractors: [{name: pearson}]
    """  # krumsiek11 is continuous with tiny negatives: log1p takes it, normalize_total refuses it
    cache = Cache(tmp_path / "cache")
    with pytest.raises(RuntimeError, match="injected failure"):
        _run(_write(tmp_path, text.replace("FAIL", "true")), registry, cache)
    result = _run(_write(tmp_path, text.replace("FAIL", "false")), registry, cache)
    stages = {report.stage: report.cached for report in result.stages}
    assert stages["preprocess:0:log1p"] is True
    assert stages["preprocess:1:scale_genes"] is False


def test_informational_metrics_need_no_direction_but_every_metric_a_declaration(tmp_path):
    from pydantic import Field

    from grnx_core import ComponentParams, EvaluationResult, Evaluator, GrnxError

    class PairCount(Evaluator):
        name = "pair_count"
        description = "The number of ranked pairs of each extractor (a count: no direction)."
        reference = "https://doi.org/10.1186/s13059-017-1382-0"
        needs = ("interactions",)
        higher_is_better = {"top_score": True}
        informational = frozenset({"n_pairs"})

        class Params(ComponentParams):
            undeclared: bool = Field(False, description="also return a metric declared nowhere")

        def evaluate(self, context):
            metrics = {}
            for name, interactions in context.interactions.items():
                metrics[f"{name}/n_pairs"] = float(len(interactions.table))
                metrics[f"{name}/top_score"] = float(interactions.table["score"].iloc[0])
            if self.undeclared:
                metrics["mystery"] = 1.0
            return EvaluationResult(metrics=metrics)

    registry = fixture_registry()
    module = types.ModuleType("grnx_informational_plugin")
    module.grnx_register_evaluators = hookimpl(lambda register: register(PairCount))
    registry.add_plugin(module, "informational-tests", "0")
    path = _write(
        tmp_path,
        """
        schema_version: 1
        name: counts
        data: {name: scanpy_builtin, params: {dataset: krumsiek11}}
        extractors: [{name: pearson}]
        evaluators: [{name: pair_count}]
    """,
    )
    result = _run(path, registry, Cache(enabled=False))
    assert result.metrics["eval/pair_count/pearson/n_pairs"] == 55.0  # 11 genes, undirected
    with pytest.raises(
        GrnxError, match="declared in neither its higher_is_better nor its informational: mystery"
    ):
        _run(path, registry, Cache(enabled=False), overrides=["evaluators.0.params.undeclared=true"])


def test_two_extractors_alike_but_for_their_id_each_keep_their_own_cache_entry(tmp_path):
    """The entry's files are named after the step id, so a recipe whose extractor differs from an
    earlier recipe's only by its id must not be served the earlier entry."""
    registry = fixture_registry()
    recipe = f"""
        schema_version: 1
        name: twins
        data: {SYNTHETIC}
        extractors: [{{name: pearson, id: STEP}}]
        evaluators: [{{name: top_pair_score}}]
    """
    cache = Cache(tmp_path / "cache")
    first = _run(_write(tmp_path, recipe.replace("STEP", "first"), "first.yaml"), registry, cache)
    second = _run(_write(tmp_path, recipe.replace("STEP", "second"), "second.yaml"), registry, cache)
    assert "extract:second" not in second.cached_stages
    again = _run(_write(tmp_path, recipe.replace("STEP", "second"), "second.yaml"), registry, cache)
    assert "extract:second" in again.cached_stages
    columns = ["source", "target", "score"]
    assert (
        first.leaf.interactions["first"]
        .table[columns]
        .equals(again.leaf.interactions["second"].table[columns])
    )


WHERE = f"""
schema_version: 1
name: where
seed: 4
data: {SYNTHETIC}
sampler: {{name: stride, params: {{step: 2}}}}
extractors:
  - {{name: pearson, id: all_types, cells: all}}
  - {{name: pearson, id: one_type, cells: all, where: {{cell_type: [group1]}}}}
  - {{name: pearson, id: one_type_sampled, where: {{cell_type: [group1], disease: [disease]}}}}
"""


def test_where_narrows_an_extractor_to_the_cells_of_one_type(tmp_path):
    """An extractor's where reads only the cells whose obs values match (of its cell set): the
    scores equal numpy's correlation over exactly those cells, the sample's included."""
    registry = fixture_registry()
    cache = Cache(tmp_path / "cache")
    result = _run(_write(tmp_path, WHERE), registry, cache)
    adata = result.context.adata
    dense = np.asarray(adata.X.todense() if hasattr(adata.X, "todense") else adata.X, dtype=np.float64)
    obs = adata.obs
    one_type = (obs["cell_type"] == "group1").to_numpy()
    sampled = np.zeros(adata.n_obs, dtype=bool)
    sampled[result.context.sample.indices] = True
    expected_cells = {
        "all_types": np.ones(adata.n_obs, dtype=bool),
        "one_type": one_type,
        "one_type_sampled": one_type & sampled & (obs["disease"] == "disease").to_numpy(),
    }
    genes = list(adata.var_names)
    for step, cells in expected_cells.items():
        expected = np.corrcoef(dense[cells], rowvar=False)
        table = result.context.interactions[step].table
        for _, row in table.head(5).iterrows():
            i, j = genes.index(row["source"]), genes.index(row["target"])
            assert abs(row["score"]) == pytest.approx(abs(expected[i, j]), abs=1e-9), step
    rerun = _run(_write(tmp_path, WHERE), registry, cache)
    assert all(_stages(rerun)[f"extract:{step}"] for step in expected_cells), (
        "each where is its own cache entry"
    )


def test_where_naming_a_missing_column_is_refused_at_validation(tmp_path):
    registry = fixture_registry()
    text = WHERE.replace("where: {cell_type: [group1]}", "where: {celltype: [group1]}")
    with pytest.raises(RecipeError, match=r"extractors.1.where: obs column 'celltype' is not in the data"):
        load_recipe(_write(tmp_path, text), registry=registry)


def test_where_on_a_step_that_reads_no_cells_is_refused(tmp_path):
    """NID reads only the model's weights: a where on it would change nothing, so it is refused."""
    registry = fixture_registry()
    text = f"""
schema_version: 1
name: where_nid
data: {SYNTHETIC}
model: {{name: mlp}}
extractors: [{{name: nid, where: {{cell_type: [group1]}}}}]
"""
    with pytest.raises(
        RecipeError,
        match=r"extractors.0.where: narrows the cells a step reads, but extractor 'nid' reads no cells",
    ):
        load_recipe(_write(tmp_path, text), registry=registry)
