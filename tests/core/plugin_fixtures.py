"""Small in-process components for runner and tracking tests: real computations, injectable failure."""

from __future__ import annotations

import json
import types

import numpy as np
from pydantic import Field

from grnx_core import (
    CellSample,
    ComponentParams,
    EvaluationResult,
    Evaluator,
    Model,
    Preprocessor,
    Sampler,
    hookimpl,
)
from grnx_core.registry import Registry

CALLS = {"scale_genes": 0, "centroid_fit": 0, "centroid_predict": 0}


class ScaleGenes(Preprocessor):
    """Divides each gene by its maximum; counts its calls so tests can see cached steps skipped."""

    name = "scale_genes"
    description = "Scale each gene to a maximum of 1."
    reference = "https://doi.org/10.1186/s13059-017-1382-0"
    writes = ("X",)

    class Params(ComponentParams):
        fail: bool = Field(False, description="raise instead of scaling (a run killed in this step)")

    def __call__(self, adata):
        CALLS["scale_genes"] += 1
        if self.fail:
            raise RuntimeError("injected failure")
        adata = adata.copy()
        maxima = np.abs(np.asarray(adata.X)).max(axis=0)
        adata.X = np.asarray(adata.X) / np.where(maxima > 0, maxima, 1)
        return adata


class TopPairScore(Evaluator):
    """Reports the best score of each extractor; fails on demand to test resuming."""

    name = "top_pair_score"
    description = "The highest interaction score of each extractor."
    reference = "https://doi.org/10.1186/s13059-017-1382-0"
    higher_is_better = {"top_score": True}
    needs = ("interactions",)

    class Params(ComponentParams):
        fail: bool = Field(False, description="raise instead of evaluating")

    def evaluate(self, context):
        if self.fail:
            raise RuntimeError("injected failure")
        return EvaluationResult(
            metrics={
                f"{name}/top_score": float(i.table["score"].iloc[0])
                for name, i in context.interactions.items()
            }
        )


class StrideSampler(Sampler):
    """Every k-th cell from a random offset: a tiny sampler whose draws depend on the seed."""

    name = "stride"
    description = "Every k-th cell, starting at a random offset."
    reference = "https://doi.org/10.1186/s13059-017-1382-0"

    class Params(ComponentParams):
        step: int = Field(2, ge=1, description="take every step-th cell")

    def sample(self, adata, rng):
        offset = int(rng.integers(self.step))
        indices = np.arange(offset, adata.n_obs, self.step)
        adata.obs["stride_chosen"] = np.isin(np.arange(adata.n_obs), indices)
        return CellSample(indices, np.ones(len(indices)), adata.n_obs, {"offset": offset})


class TopScoreStability(TopPairScore):
    """TopPairScore with the repeat protocol: squared error of each repeat against all cells."""

    name = "top_score_stability"
    needs_reference = True
    higher_is_better = {"top_score": True, "mse_vs_reference": False}

    def aggregate(self, repeat_results, reference):
        errors = [
            (result.metrics[key] - reference.metrics[key]) ** 2
            for result in repeat_results
            for key in result.metrics
        ]
        return {"mse_vs_reference": float(np.mean(errors))}


class CentroidModel(Model):
    """Nearest class centroid on the expression: a model cheap enough to count its fits."""

    name = "centroid"
    description = "Nearest class centroid of the cells' expression."
    reference = "https://doi.org/10.1073/pnas.082099299"
    input_kind = "adata"

    class Params(ComponentParams):
        pass

    def fit(self, context):
        CALLS["centroid_fit"] += 1
        adata, _ = context.sampled_adata()
        key = context.roles.label_key
        labels = adata.obs[key].astype(str).to_numpy()
        matrix = np.asarray(adata.X.todense() if hasattr(adata.X, "todense") else adata.X, dtype=float)
        self.classes_ = sorted(set(labels))
        self.centroids_ = np.stack([matrix[labels == c].mean(axis=0) for c in self.classes_])
        self.cells_ = [str(name) for name in adata.obs_names]
        context.logger.log_metrics({"train/n_cells": len(labels)}, step=0)
        return self

    def use_device(self, device):
        CALLS["centroid_device"] = device

    def predict(self, inputs):
        CALLS["centroid_predict"] += 1
        matrix = np.asarray(inputs.X.todense() if hasattr(inputs.X, "todense") else inputs.X, dtype=float)
        distances = ((matrix[:, None, :] - self.centroids_[None, :, :]) ** 2).sum(axis=2)
        return np.asarray(self.classes_, dtype=object)[distances.argmin(axis=1)]

    def save(self, path):
        path.mkdir(parents=True)
        (path / "centroid.json").write_text(
            json.dumps(
                {"classes": self.classes_, "centroids": self.centroids_.tolist(), "cells": self.cells_}
            )
        )

    @classmethod
    def load(cls, path):
        stored = json.loads((path / "centroid.json").read_text())
        model = cls()
        model.classes_, model.centroids_, model.cells_ = (
            stored["classes"],
            np.array(stored["centroids"]),
            stored["cells"],
        )
        return model


def fixture_registry() -> Registry:
    """The installed plugins plus the components above, in a fresh registry."""
    registry = Registry.from_entry_points()
    module = types.ModuleType("grnx_core_test_plugin")
    module.grnx_register_preprocessors = hookimpl(lambda register: register(ScaleGenes))
    module.grnx_register_evaluators = hookimpl(
        lambda register: [register(TopPairScore), register(TopScoreStability)]
    )
    module.grnx_register_samplers = hookimpl(lambda register: register(StrideSampler))
    module.grnx_register_models = hookimpl(lambda register: register(CentroidModel))
    registry.add_plugin(module, "core-tests", "0")
    return registry
