"""leiden against scanpy called directly, and its UMAP figure."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
from matplotlib.figure import Figure

from grnx_core.errors import DataError
from grnx_plugins.preprocess.leiden import Leiden


def graph(adata):
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=10)
    sc.pp.neighbors(adata, n_neighbors=10)
    return adata


def test_matches_scanpy(counts_adata):
    adata = graph(counts_adata)
    expected = adata.copy()
    sc.tl.leiden(expected, resolution=0.5, flavor="igraph", n_iterations=2, directed=False, random_state=4)
    result = Leiden(resolution=0.5, seed=4)(adata)
    np.testing.assert_array_equal(result.obs["leiden"], expected.obs["leiden"])
    # The three planted clusters come out as (nearly) pure Leiden clusters.
    crosstab = np.asarray(__import__("pandas").crosstab(result.obs["leiden"], result.obs["cell_type"]))
    assert crosstab.max(axis=1).sum() / crosstab.sum() > 0.9


def test_needs_neighbors_and_draws_a_figure(make_adata):
    with pytest.raises(DataError, match="add the 'neighbors' step"):
        Leiden()(make_adata())
    adata = graph(make_adata(n_cells=120))
    sc.tl.umap(adata)
    result = Leiden(key_added="cluster", color_by=["batch"])(adata)
    figures = Leiden(key_added="cluster", color_by=["batch"]).figures(result)
    assert list(figures) == ["leiden_umap"] and isinstance(figures["leiden_umap"], Figure)
    titles = [ax.get_title() for ax in figures["leiden_umap"].axes if ax.get_title()]
    assert titles == ["cluster", "batch"]


def test_seed_changes_an_ambiguous_partition_and_none_acts_as_zero():
    """Points without clusters: the partition depends on the node order, hence on the seed."""
    import anndata as ad
    from sklearn.metrics import adjusted_rand_score

    points = np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32)
    adata = ad.AnnData(points, obsm={"X_pca": points})
    sc.pp.neighbors(adata, n_neighbors=10)
    labels = {seed: Leiden(seed=seed)(adata.copy()).obs["leiden"].to_numpy() for seed in (0, 1)}
    np.testing.assert_array_equal(Leiden(seed=1)(adata.copy()).obs["leiden"], labels[1])
    assert adjusted_rand_score(labels[0], labels[1]) < 0.9
    np.testing.assert_array_equal(Leiden()(adata.copy()).obs["leiden"], labels[0])
