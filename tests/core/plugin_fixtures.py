"""Small in-process components for runner and tracking tests: real computations, injectable failure."""

from __future__ import annotations

import types

import numpy as np
from pydantic import Field

from grnx_core import (
    CellSample,
    ComponentParams,
    EvaluationResult,
    Evaluator,
    Preprocessor,
    Sampler,
    hookimpl,
)
from grnx_core.registry import Registry

CALLS = {"scale_genes": 0}


class ScaleGenes(Preprocessor):
    """Divides each gene by its maximum; counts its calls so tests can see cached steps skipped."""

    name = "scale_genes"
    description = "Scale each gene to a maximum of 1."
    reference = "https://doi.org/10.1186/s13059-017-1382-0"
    writes = ("X",)

    class Params(ComponentParams):
        pass

    def __call__(self, adata):
        CALLS["scale_genes"] += 1
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

    class Params(ComponentParams):
        fail: bool = Field(False, description="raise instead of evaluating")

    def evaluate(self, context):
        if self.fail:
            raise RuntimeError("injected failure")
        return EvaluationResult(
            metrics={f"{name}/top_score": float(i.table["score"].iloc[0]) for name, i in context.interactions.items()}
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
            for result in repeat_results for key in result.metrics
        ]
        return {"mse_vs_reference": float(np.mean(errors))}


def fixture_registry() -> Registry:
    """The installed plugins plus the components above, in a fresh registry."""
    registry = Registry.from_entry_points()
    module = types.ModuleType("grnx_core_test_plugin")
    module.grnx_register_preprocessors = hookimpl(lambda register: register(ScaleGenes))
    module.grnx_register_evaluators = hookimpl(
        lambda register: [register(TopPairScore), register(TopScoreStability)]
    )
    module.grnx_register_samplers = hookimpl(lambda register: register(StrideSampler))
    registry.add_plugin(module, "core-tests", "0")
    return registry
