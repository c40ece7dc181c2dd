"""Sampler diversity metrics against direct computations: counts, Kish ESS, scipy's Hausdorff distance."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist, directed_hausdorff

from grnx_core import CellSample, DataError, DataRoles, RunContext
from grnx_plugins.evaluators.sampler_diversity import SamplerDiversityEvaluator
from grnx_plugins.samplers import _metrics


def labelled_cells(seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    labels = np.array(["T"] * 150 + ["B"] * 40 + ["pDC"] * 6 + ["HSC"] * 4)
    adata = ad.AnnData(
        X=rng.poisson(2.0, (200, 30)).astype(np.float32), obs=pd.DataFrame({"cell_type": labels})
    )
    adata.obs_names = [f"c{i}" for i in range(200)]
    adata.obsm["X_pca"] = rng.normal(size=(200, 5))
    return adata


def context_for(adata, indices, weights=None) -> RunContext:
    weights = np.ones(len(indices)) if weights is None else weights
    sample = CellSample(indices=np.asarray(indices), weights=weights, n_cells_total=adata.n_obs)
    return RunContext(adata=adata, sample=sample, roles=DataRoles(cell_type_key="cell_type"))


def test_metrics_equal_direct_computations():
    adata = labelled_cells()
    rng = np.random.default_rng(1)
    indices = np.sort(np.concatenate([rng.choice(150, 14, replace=False), [150, 151, 190, 191, 192, 196]]))
    weights = rng.gamma(2.0, 1.0, indices.size)
    result = SamplerDiversityEvaluator().evaluate(context_for(adata, indices, weights)).metrics

    # Rare groups below 5% of 200 cells: pDC (6) and HSC (4), 10 cells; the sample holds 3 + 1 of them.
    assert result["n_rare_cells"] == 10 and result["n_rare_sampled"] == 4
    assert result["rare_recovery"] == pytest.approx((4 / 20) / (10 / 200))
    assert result["rare_recovery/pDC"] == pytest.approx((3 / 20) / (6 / 200))
    assert result["rare_recovery/HSC"] == pytest.approx((1 / 20) / (4 / 200))
    assert result["group_coverage"] == 1.0
    assert result["effective_sample_size"] == pytest.approx(weights.sum() ** 2 / (weights**2).sum())
    points = adata.obsm["X_pca"]
    assert result["hausdorff"] == pytest.approx(directed_hausdorff(points, points[indices])[0])
    assert result["nearest_distance_mean"] == pytest.approx(cdist(points, points[indices]).min(axis=1).mean())


def test_chunked_kd_tree_query_equals_brute_force(monkeypatch):
    rng = np.random.default_rng(3)
    points = rng.normal(size=(1000, 4))
    indices = rng.choice(1000, 30, replace=False)
    monkeypatch.setattr(_metrics, "QUERY_CHUNK", 77)
    distances = _metrics.nearest_sample_distances(points, indices)
    np.testing.assert_allclose(distances, cdist(points, points[indices]).min(axis=1))
    assert _metrics.directed_hausdorff_to_sample(points, indices)[0] == pytest.approx(
        directed_hausdorff(points, points[indices])[0]
    )


def test_named_rare_values_missed_groups_and_no_sample():
    adata = labelled_cells()
    result = SamplerDiversityEvaluator(rare_values=["B"]).evaluate(context_for(adata, np.arange(100))).metrics
    assert result["rare_recovery"] == 0.0 and result["group_coverage"] == 0.25
    everything = (
        SamplerDiversityEvaluator()
        .evaluate(RunContext(adata=adata, roles=DataRoles(cell_type_key="cell_type")))
        .metrics
    )
    assert everything["rare_recovery"] == 1.0 and everything["hausdorff"] == 0.0
    assert everything["effective_sample_size"] == 200


def test_fallback_pca_is_used_without_obsm():
    adata = labelled_cells()
    del adata.obsm["X_pca"]
    result = SamplerDiversityEvaluator().evaluate(context_for(adata, np.arange(0, 200, 4))).metrics
    assert result["hausdorff"] > 0 and "X_pca" not in adata.obsm


def test_unusable_settings_are_refused():
    adata = labelled_cells()
    with pytest.raises(DataError, match="no group of obs\\['cell_type'\\] holds less than rare_share=0.01"):
        SamplerDiversityEvaluator(rare_share=0.01).evaluate(context_for(adata, np.arange(10)))
    with pytest.raises(DataError, match="rare_values \\['NK'\\] are not groups"):
        SamplerDiversityEvaluator(rare_values=["NK"]).evaluate(context_for(adata, np.arange(10)))
    with pytest.raises(DataError, match="obs column 'state'"):
        SamplerDiversityEvaluator(key="state").evaluate(context_for(adata, np.arange(10)))
    smaller = CellSample(indices=np.arange(5), weights=np.ones(5), n_cells_total=150)
    with pytest.raises(DataError, match="drawn from 150 cells but the data has 200"):
        SamplerDiversityEvaluator().evaluate(
            RunContext(adata=adata, sample=smaller, roles=DataRoles(cell_type_key="cell_type"))
        )
