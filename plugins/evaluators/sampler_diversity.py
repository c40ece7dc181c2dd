"""How diverse the run's cell sample is: rare-state recovery, effective sample size, Hausdorff distance."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from grnx_core import ComponentParams, DataError, EvaluationResult, Evaluator, RunContext
from grnx_core.components import role_field


class SamplerDiversityEvaluator(Evaluator):
    """Scores the sample (``cells: sample``, the default with a sampler) against all prepared cells.

    Metrics (definitions in ``grnx_plugins.samplers._metrics``):

    - ``rare_recovery``: share of the rare cells in the sample over their share in the data, for
      the cells whose ``obs[key]`` is in ``rare_values`` (or, when None, in every group below
      ``rare_share`` of the cells); ``rare_recovery/<group>`` per group; 1 is what a uniform sample
      gives in expectation;
    - ``group_coverage``: share of the groups of ``obs[key]`` with at least one sampled cell;
    - ``hausdorff``: directed Hausdorff distance from every cell to the sample in PCA space
      (``obsm[obsm_key]``, else the samplers' fallback PCA, see ``grnx_plugins.samplers._embedding``),
      and ``nearest_distance_mean``, the mean distance of a cell to its nearest sampled cell;
    - ``effective_sample_size`` of the sample's weights, ``(sum w)^2 / sum w^2``, and its ratio to
      the sample size; ``sampler_seconds`` / ``sampler_cpu_seconds`` when the sampler timed itself
      (WDS's passes). The cache stage record holds every sampler's wall time.

    Without a sampler every cell is the "sample" (recovery 1, Hausdorff 0): the all-cells reference.
    """

    name = "sampler_diversity"
    description = "Rare-state recovery, effective sample size and Hausdorff distance of the cell sample."
    reference = "https://doi.org/10.1016/j.cels.2019.05.003"
    needs: ClassVar[tuple[str, ...]] = ("data", "cells")

    class Params(ComponentParams):
        key: str | None = role_field("cell_type_key", "obs column whose groups define the rare states")
        rare_values: list[str] | None = Field(
            None,
            min_length=1,
            description="groups of obs[key] that are the rare states; when None, those below rare_share",
        )
        rare_share: float = Field(
            0.05,
            gt=0,
            lt=1,
            description="groups holding less than this share of the cells are rare (rare_values None)",
        )
        obsm_key: str = Field("X_pca", description="obsm key of the coordinates for the Hausdorff distance")
        n_pcs: int = Field(50, ge=1, description="leading components used for the Hausdorff distance")

    higher_is_better: ClassVar[dict[str, bool]] = {
        "rare_recovery": True,
        "group_coverage": True,
        "hausdorff": False,
        "nearest_distance_mean": False,
    }
    informational: ClassVar[frozenset[str]] = frozenset(
        {
            "n_cells",
            "n_cells_total",
            "n_rare_cells",
            "n_rare_sampled",
            "rare_share_expected",
            "effective_sample_size",
            "effective_sample_size_ratio",
            "sampler_seconds",
            "sampler_cpu_seconds",
        }
    )

    def evaluate(self, context: RunContext) -> EvaluationResult:
        from grnx_plugins.evaluators.classification import metric_labels
        from grnx_plugins.samplers import _metrics as metrics
        from grnx_plugins.samplers._embedding import pca_coordinates

        who = f"evaluator {self.name!r}"
        adata = context.require_adata(who)
        sample = context.sample
        n_obs = adata.n_obs
        indices = np.arange(n_obs) if sample is None else np.asarray(sample.indices)
        weights = np.ones(n_obs) if sample is None else np.asarray(sample.weights)
        if indices.size == 0:
            raise DataError(f"{who}: the sample is empty; there is nothing to score.")
        if sample is not None and sample.n_cells_total != n_obs:
            raise DataError(
                f"{who}: the sample was drawn from {sample.n_cells_total} cells but the data has {n_obs}; "
                f"score it against the data it was drawn from."
            )
        if np.any(weights < 0) or not np.any(weights > 0):
            raise DataError(f"{who}: the sample weights must be non-negative and not all zero.")

        key = context.require_obs(self.key or context.roles.cell_type_key, "cell_type_key", who)
        labels = adata.obs[key].astype(str)
        groups = sorted(labels.unique())
        rare = (
            self.rare_values if self.rare_values is not None else metrics.rare_groups(labels, self.rare_share)
        )
        unknown = sorted(set(rare) - set(groups))
        if unknown:
            raise DataError(
                f"{who}: rare_values {unknown} are not groups of obs[{key!r}] (groups: {', '.join(groups[:20])})."
            )
        if not rare:
            shares = labels.value_counts(normalize=True)
            raise DataError(
                f"{who}: no group of obs[{key!r}] holds less than rare_share={self.rare_share:g} of the cells "
                f"(smallest: {shares.idxmin()!r} with {shares.min():.3f}). Set params.rare_values or raise "
                f"params.rare_share."
            )

        label_array = labels.to_numpy()
        is_rare = np.isin(label_array, rare)
        values: dict[str, float] = {
            "n_cells": float(indices.size),
            "n_cells_total": float(n_obs),
            "n_rare_cells": float(is_rare.sum()),
            "n_rare_sampled": float(is_rare[indices].sum()),
            "rare_share_expected": float(is_rare.mean()),
            "rare_recovery": metrics.recovery(is_rare, indices),
            "group_coverage": len(set(label_array[indices])) / len(groups),
        }
        names = metric_labels(list(rare))
        for group in rare:
            values[f"rare_recovery/{names[group]}"] = metrics.recovery(label_array == group, indices)
        coordinates = pca_coordinates(adata, self.obsm_key, self.n_pcs, who)
        values["hausdorff"], values["nearest_distance_mean"] = metrics.directed_hausdorff_to_sample(
            coordinates, indices
        )
        values["effective_sample_size"] = metrics.effective_sample_size(weights)
        values["effective_sample_size_ratio"] = values["effective_sample_size"] / indices.size
        if sample is not None:
            wall = [v for k, v in sample.info.items() if k.endswith("_seconds") and "cpu" not in k]
            cpu = [v for k, v in sample.info.items() if k.endswith("_cpu_seconds")]
            if wall:
                values["sampler_seconds"] = float(sum(float(v) for v in wall))
            if cpu:
                values["sampler_cpu_seconds"] = float(sum(float(v) for v in cpu))
        return EvaluationResult(metrics=values)
