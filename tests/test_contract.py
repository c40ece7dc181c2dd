"""The contract suite: every registered component, built-in or not, keeps the component contract.

Static checks read the class (name, description, Params, constructor). Behavioural checks run each
component on tiny fixtures with ``grnx_core.testing`` (return types, declared writes, sparse vs
dense, same seed, save/load). ``CASES`` gives the parameters and earlier stages of the built-ins
that need them; the tests at the end show that each behavioural check catches a broken component.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import Field, ValidationError

from grnx_core import (
    CellSample,
    ComponentParams,
    DataSource,
    EvaluationResult,
    Evaluator,
    Extractor,
    Interactions,
    Model,
    Preprocessor,
    Sampler,
    TokenizedCells,
    Tokenizer,
)
from grnx_core.components import KIND_BASES, Kind, constructor_fields
from grnx_core.registry import Registry
from grnx_core.testing import (
    KIND_CHECKS,
    Case,
    CheckItem,
    SkipComponent,
    check_component,
    check_model,
    check_preprocessor,
    declared_writes,
    make_adata,
    pytest_params,
    written_keys,
)

REGISTRY = Registry.from_entry_points()
ENTRIES = [entry for kind in Kind for entry in REGISTRY.entries[kind].values()]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GRNX_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
GENEFORMER_V2 = SHARED_DATA / "geneformer" / "v2"


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
        Kind.DATA: "load",
        Kind.PREPROCESSOR: "__call__",
        Kind.SAMPLER: "sample",
        Kind.TOKENIZER: "transform",
        Kind.MODEL: "fit",
        Kind.EXTRACTOR: "extract",
        Kind.EVALUATOR: "evaluate",
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


# ---------------------------------------------------------------------------------------------
# Behaviour of the registered components on the fixtures of grnx_core.testing
# ---------------------------------------------------------------------------------------------

NORMALISED = (("normalize_total", {}), ("log1p", {}))
GRAPH = (("pca", {"n_comps": 5}), ("neighbors", {"n_neighbors": 10}))
# Tiny models: one epoch (make_context), width 8, one layer, no dropout, sequences of 16-18 tokens.
SCALED_TOKENS = ("expression_scaled", {"max_length": 16})
TINY_CELLUFORMER = ("celluformer", {"d_model": 8, "n_layers": 1, "n_heads": 2, "d_ff": 16, "dropout": 0.0})
TINY_MLP = ("mlp", {"hidden_sizes": [8], "dropout": 0.0})


def _rank_value_params(files) -> dict[str, Any]:
    """rank_value with the suite's token dictionary (the fixture's Ensembl ids) and fitted medians."""
    return {
        "token_dictionary": str(files.token_dictionary),
        "gene_medians": "fit",
        "gene_id_key": "ensembl_id",
        "model_input_size": 18,
    }


def _rosmap_params(files) -> dict[str, Any]:
    return {
        "counts": str(files.rosmap_counts),
        "batch_column": "library",
        "batch_table": str(files.rosmap_batches),
        "clinical_table": str(files.rosmap_clinical),
        "diagnosis_map": {"1": "Not AD", "4": "AD"},
    }


GENEFORMER_DICTIONARIES = Case(
    {"dictionary_dir": str(GENEFORMER_V2), "gene_id_key": "ensembl_id", "model_input_size": 18},
    name="geneformer_v2",
    skip=None
    if GENEFORMER_V2.is_dir()
    else (
        f"Geneformer's V2 dictionaries are not at {GENEFORMER_V2} (../shared/data beside the project, or "
        "$GRNX_SHARED_DATA); the suite's own token dictionary case runs instead"
    ),
)

#: "kind:name" -> the Case(s) a built-in runs with; components not listed run with their defaults.
CASES: dict[str, Case | list[Case]] = {
    "data:scanpy_builtin": [
        Case({"dataset": "krumsiek11"}, name="krumsiek11"),
        Case({"dataset": "pbmc68k_reduced"}, name="pbmc68k_reduced"),
    ],
    "data:h5ad": Case(lambda f: {"path": str(f.h5ad)}, dense_params=lambda f: {"path": str(f.h5ad_dense)}),
    "data:10x_mtx": Case(lambda f: {"path": str(f.mtx_folder)}),
    "data:csv": Case(lambda f: {"path": str(f.csv), "values": "counts"}),
    "data:synthetic": [
        Case({"n_cells": 60, "n_genes": 30, "n_regulators": 6, "n_donors": 4}),
        Case(
            {
                "n_cells": 200,
                "n_genes": 30,
                "n_regulators": 6,
                "n_donors": 4,
                "donor_design": "balanced",
                "n_de_genes": 3,
                "rare_state_fraction": 0.05,
                "n_state_edges": 3,
                "interaction_label": True,
                "depth": "requested",
                "ground_truth_edges": "state",
            },
            name="v2",
        ),
    ],
    "data:rosmap": Case(_rosmap_params),
    "preprocessor:map_gene_ids": Case(lambda f: {"table": str(f.gene_table)}),
    "preprocessor:scrublet": Case({"n_prin_comps": 5}),
    "preprocessor:qc_filter": Case({"min_genes": 5, "min_cells": 3, "max_pct_mt": 60}),
    "preprocessor:normalize_total": Case({"key_added": "size_factor"}),
    "preprocessor:highly_variable_genes": [
        Case({"n_top_genes": 10}, before=NORMALISED),
        Case({"n_top_genes": 10, "subset": True}, name="subset", before=NORMALISED),
    ],
    "preprocessor:regress_out": Case({"keys": ["n_counts"]}),
    "preprocessor:pca": Case({"n_comps": 5}),
    "preprocessor:neighbors": Case({"n_neighbors": 10}, before=(("pca", {"n_comps": 5}),)),
    "preprocessor:leiden": Case({}, before=GRAPH),
    "preprocessor:umap": Case({}, before=GRAPH),
    "preprocessor:keep_annotated": Case(lambda f: {"table": str(f.annotation), "columns": ["annotation"]}),
    "preprocessor:split": Case({"donor_key": "donor", "label_key": "label"}),
    "preprocessor:balance": Case({"label_key": "label", "cell_type_key": "cell_type"}),
    "preprocessor:select_cells": Case({"where": {"cell_type": ["T", "B"]}}),
    "sampler:wds": [
        Case({"fraction": 0.5, "n_hashes": 16, "n_buckets": 16}),
        Case(
            {"fraction": 0.5, "n_hashes": 16, "kernel_power": 2, "weighting": "inverse_power", "power": 1.0},
            name="sharp",
        ),
    ],
    "sampler:uniform": Case({"fraction": 0.5}),
    "sampler:stratified": Case({"fraction": 0.5, "key": "cell_type"}),
    "sampler:geosketch": Case({"fraction": 0.5}),
    "sampler:scsampler": Case({"fraction": 0.5}),
    "sampler:kernel_herding": Case({"fraction": 0.5}),
    "tokenizer:rank_value": [Case(_rank_value_params), GENEFORMER_DICTIONARIES],
    "tokenizer:expression_scaled": Case({"max_length": 16}),
    "tokenizer:binned": Case({"max_length": 17, "n_bins": 11}),
    "model:celluformer": Case(TINY_CELLUFORMER[1], tokenizer=SCALED_TOKENS),
    "model:geneformer": Case(
        {
            "n_layers": 1,
            "hidden_size": 8,
            "n_heads": 2,
            "intermediate_size": 16,
            "max_positions": 32,
            "dropout": 0.0,
        },
        tokenizer=("rank_value", _rank_value_params),
    ),
    "model:scgpt": Case(
        {"d_model": 8, "n_layers": 1, "n_heads": 2, "d_ff": 16, "dropout": 0.0, "n_layers_cls": 1},
        tokenizer=("binned", {"max_length": 17, "n_bins": 11}),
    ),
    "model:mlp": Case(TINY_MLP[1]),
    "extractor:attention": Case({}, tokenizer=SCALED_TOKENS, model=TINY_CELLUFORMER),
    "extractor:insilico_perturbation": Case(
        {"max_cells": 6}, tokenizer=SCALED_TOKENS, model=TINY_CELLUFORMER
    ),
    "extractor:pearson": [
        Case({}),
        Case({"group_key": "label", "case": "case", "control": "control"}, name="grouped"),
    ],
    "extractor:spearman": Case({}),
    "extractor:nid": Case({"tile_size": 7}, model=TINY_MLP),
    # arboreto's default 1,000 trees per target take minutes on 2 cores
    "extractor:genie3": Case({"n_estimators": 20}),
    "extractor:cscore": [
        Case({}),
        Case({"group_key": "label", "case": "case", "control": "control"}, name="grouped"),
    ],
    "extractor:embedding_similarity": [
        Case({}, tokenizer=SCALED_TOKENS, model=TINY_CELLUFORMER),
        Case({"source": "contextual"}, name="contextual", tokenizer=SCALED_TOKENS, model=TINY_CELLUFORMER),
    ],
    "evaluator:nes": Case({"permutations": 50}),
    "evaluator:nes_stability": Case({"permutations": 50}),
    "evaluator:auprc": Case({"stability_top_k": 5}),
    "evaluator:sampler_diversity": Case({"rare_values": ["NK"]}),
    "evaluator:classification": [
        Case({}, model=TINY_MLP),
        Case({}, name="tokens", tokenizer=SCALED_TOKENS, model=TINY_CELLUFORMER),
    ],
}

BEHAVIOUR = pytest_params(REGISTRY, CASES)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread; on a busy machine two threads wait on each other."""
    try:
        import torch
    except ImportError:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("item", BEHAVIOUR)
def test_component_behaviour(item: CheckItem):
    try:
        item.run()
    except SkipComponent as reason:
        pytest.skip(str(reason))


def test_cases_name_registered_components():
    registered = {f"{entry.kind.value}:{entry.name}" for entry in ENTRIES}
    assert sorted(set(CASES) - registered) == []


def test_every_component_with_required_params_has_a_case():
    """A built-in that cannot run with its defaults must be given parameters, not skipped silently."""
    missing = []
    for entry in ENTRIES:
        try:
            entry.load().Params()
        except ValidationError:
            if f"{entry.kind.value}:{entry.name}" not in CASES:
                missing.append(f"{entry.kind.value}:{entry.name}")
    assert missing == []


def test_every_kind_runs_every_check():
    ran = {(item.values[0].checker.kind, item.values[0].check) for item in BEHAVIOUR}
    assert {(kind, check) for kind, checks in KIND_CHECKS.items() for check in checks} <= ran


# ---------------------------------------------------------------------------------------------
# Each check catches a broken component
# ---------------------------------------------------------------------------------------------


class _NoParams(ComponentParams):
    pass


class _Base:
    description = "A deliberately broken component for the contract suite's own tests."
    reference = "https://example.org/contract"
    Params = _NoParams


class _DataFrameSource(_Base, DataSource):
    name = "dataframe_source"

    def load(self):
        return pd.DataFrame({"a": [1]})


class _FractionalCounts(_Base, DataSource):
    name = "fractional_counts"

    def load(self):
        adata = make_adata()
        adata.layers["counts"] = adata.layers["counts"] * 0.5
        adata.uns["grnx_data"] = {"counts": "layers/counts"}
        return adata


class _Flag(_Base, Preprocessor):
    """Writes obs["flag"]; declares it only when asked to."""

    name = "flag"
    writes = ("obs/flag",)

    def __call__(self, adata):
        adata.obs["flag"] = 1
        return adata


class _FlagAndX(_Flag):
    name = "flag_and_x"

    def __call__(self, adata):
        adata = super().__call__(adata)
        adata.X = adata.X * 2
        return adata


class _Unseeded(_Base, Preprocessor):
    name = "unseeded"
    writes = ("obs/noise",)

    def __call__(self, adata):
        adata.obs["noise"] = np.random.default_rng().random(adata.n_obs)
        return adata


class _LayoutDependent(_Base, Preprocessor):
    name = "layout_dependent"
    writes = ("obs/detected",)

    def __call__(self, adata):
        import scipy.sparse as sp

        # Counts stored zeros in one layout only: the classic sparse/dense bug.
        detected = (adata.X != 0).sum(axis=1) if sp.issparse(adata.X) else np.full(adata.n_obs, adata.n_vars)
        adata.obs["detected"] = np.asarray(detected).ravel()
        return adata


class _RepeatingSampler(_Base, Sampler):
    name = "repeating"

    def sample(self, adata, rng):
        return CellSample(indices=[0, 0, 1], weights=[1.0, 1.0, 1.0], n_cells_total=adata.n_obs)


class _MemorySampler(_Base, Sampler):
    name = "memory_only"

    def sample(self, adata, rng):
        first = 1 if adata.isbacked else 0
        return CellSample(
            indices=np.arange(first, 10), weights=np.ones(10 - first), n_cells_total=adata.n_obs
        )


class _ForgetfulTokenizer(_Base, Tokenizer):
    """Fits the gene order but keeps it in an attribute without the trailing ``_``, so save loses it."""

    name = "forgetful"

    def fit(self, adata):
        self.genes = list(reversed(adata.var_names))
        return self

    def transform(self, adata, obs_columns=None):
        genes = getattr(self, "genes", list(adata.var_names))
        ids = np.array([genes.index(g) + 1 for g in adata.var_names] * adata.n_obs)
        offsets = np.arange(adata.n_obs + 1) * adata.n_vars
        obs = adata.obs[list(obs_columns or [])].copy()
        return TokenizedCells(input_ids=ids, offsets=offsets, obs=obs, vocabulary=["<pad>", *genes])


class _NoObsTokenizer(_ForgetfulTokenizer):
    name = "drops_obs"

    def transform(self, adata, obs_columns=None):
        return super().transform(adata, obs_columns=[])


class _CentroidModel(_Base, Model):
    """Class centroids of the counts; ``noise`` adds unseeded jitter, ``forget`` loads badly."""

    name = "centroid"
    input_kind = "adata"
    noise = False
    forget = False

    def fit(self, context):
        adata = context.adata
        matrix = np.asarray(adata.X.todense()) if hasattr(adata.X, "todense") else np.asarray(adata.X)
        labels = adata.obs["label"].astype(str).to_numpy()
        self.classes_ = sorted(set(labels))
        self.centroids_ = np.stack([matrix[labels == c].mean(axis=0) for c in self.classes_])
        if self.noise:
            self.centroids_ = self.centroids_ + np.random.default_rng().random(self.centroids_.shape)
        return self

    def _distances(self, adata):
        matrix = np.asarray(adata.X.todense()) if hasattr(adata.X, "todense") else np.asarray(adata.X)
        return ((matrix[:, None, :] - self.centroids_[None]) ** 2).sum(axis=2)

    def predict(self, inputs):
        return np.asarray(self.classes_, dtype=object)[self._distances(inputs).argmin(axis=1)]

    def embed(self, inputs):
        return self._distances(inputs)

    def save(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        np.save(Path(path) / "centroids.npy", self.centroids_)
        (Path(path) / "classes.txt").write_text("\n".join(self.classes_))

    @classmethod
    def load(cls, path):
        model = cls()
        model.classes_ = (Path(path) / "classes.txt").read_text().split("\n")
        model.centroids_ = np.load(Path(path) / "centroids.npy")
        if cls.forget:
            model.centroids_ = np.zeros_like(model.centroids_)
        return model


class _NoisyModel(_CentroidModel):
    name = "noisy_centroid"
    noise = True


class _ForgetfulModel(_CentroidModel):
    name = "forgetful_centroid"
    forget = True


class _SelfPairs(_Base, Extractor):
    name = "self_pairs"

    def extract(self, context):
        genes = list(context.adata.var_names)
        table = pd.DataFrame({"source": genes[:3], "target": genes[:3], "score": [3.0, 2.0, 1.0]})
        return Interactions(table, directed=False, extractor=self.name, genes=genes)


class _UndirectedMetric(_Base, Evaluator):
    name = "undirected_metric"
    higher_is_better = {"auprc": True}

    def evaluate(self, context):
        return EvaluationResult(metrics={"auprc": 0.5, "mystery": 1.0})


class _InformationalMetric(_UndirectedMetric):
    """The control: a count declared informational needs no direction."""

    name = "informational_metric"
    informational = frozenset({"mystery"})


class _BothWays(_UndirectedMetric):
    name = "both_ways"
    higher_is_better = {"auprc": True, "mystery": True}
    informational = frozenset({"mystery"})


class _Writes(_Base, Preprocessor):
    name = "writes"
    writes = ("X", "layers/*", "obs/<key>", "obsm['X_pca']", 'uns["neighbors"]', "var/<keys>")

    class Params(ComponentParams):
        key: str | None = Field(None, description="obs column")
        keys: list[str] = Field(default_factory=list, description="var columns")

    def __call__(self, adata):
        return adata


@pytest.mark.parametrize(
    ("component", "check", "message"),
    [
        (_DataFrameSource, "returns_type", "not an AnnData"),
        (_FractionalCounts, "counts_declared", "not non-negative integers"),
        (_FlagAndX, "writes_declared", "writes X"),
        (_Unseeded, "same_seed", "obs\\['noise'\\]"),
        (_LayoutDependent, "sparse_dense", "obs\\['detected'\\]"),
        (_RepeatingSampler, "returns_type", "repeat a cell"),
        (_MemorySampler, "backed", "backed AnnData gives another sample"),
        (_NoObsTokenizer, "returns_type", "lacks the asked columns"),
        (_ForgetfulTokenizer, "save_load", "loaded tokenizer transforms to other tokens"),
        (_NoisyModel, "same_seed", "embeddings"),
        (_ForgetfulModel, "save_load", "loaded model gives other outputs"),
        (_SelfPairs, "returns_type", "paired with itself"),
        (
            _UndirectedMetric,
            "returns_type",
            "declared in neither higher_is_better nor informational.*mystery",
        ),
        (_BothWays, "returns_type", "both in higher_is_better and informational.*mystery"),
    ],
    ids=lambda value: value.name if isinstance(value, type) else None,
)
def test_check_catches_broken_component(component, check, message):
    with pytest.raises(AssertionError, match=message):
        check_component(component, checks=[check])


def test_correct_versions_of_broken_components_pass():
    """The controls: the same fixtures, components that keep the contract."""
    assert check_preprocessor(_Flag) == ["returns_type", "writes_declared", "same_seed", "sparse_dense"]
    assert check_model(_CentroidModel) == ["returns_type", "same_seed", "sparse_dense", "save_load"]
    with pytest.raises(TypeError, match="is a model, not a preprocessor"):
        check_preprocessor(_CentroidModel)
    check_component(_InformationalMetric, checks=["returns_type"])
    assert _InformationalMetric.metric_direction("x/mystery") is None
    assert _InformationalMetric.declares("x/mystery") and not _UndirectedMetric.declares("x/mystery")


def test_declared_writes_resolve_placeholders_and_both_notations():
    declared = declared_writes(_Writes(key="score", keys=["a", "b"]))
    assert declared == {"X", "layers/*", "obs/score", "obsm/X_pca", "uns/neighbors", "var/a", "var/b"}
    assert declared_writes(_Writes()) == {"X", "layers/*", "obsm/X_pca", "uns/neighbors"}


def test_written_keys_allows_removing_cells_but_not_changing_kept_values():
    before = make_adata()
    after = before[before.obs["label"] == "case"].copy()
    assert written_keys(before, after) == set()
    after.obs.loc[after.obs_names[0], "batch"] = (
        "batch1" if after.obs["batch"].iloc[0] == "batch0" else "batch0"
    )
    after.obsm["X_new"] = np.zeros((after.n_obs, 2))
    del after.layers["counts"]
    assert written_keys(before, after) == {"obs/batch", "obsm/X_new", "layers/counts"}


class _NeedsPath(_Base, DataSource):
    name = "needs_path"

    class Params(ComponentParams):
        path: str = Field(description="file to read")

    def load(self):
        return make_adata()


def test_a_component_needing_params_is_skipped_with_the_reason():
    with pytest.raises(SkipComponent, match="required parameters \\(path\\)"):
        check_component(_NeedsPath, checks=["returns_type"])
    assert check_component(_NeedsPath, {"path": "unused"}, checks=["returns_type"]) == ["returns_type"]
