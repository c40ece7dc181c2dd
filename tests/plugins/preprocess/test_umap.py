"""umap against scanpy called directly, and its figure."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc

from grnx_core.errors import DataError
from grnx_plugins.preprocess.umap import Umap


def test_matches_scanpy_and_draws(make_adata):
    adata = make_adata(n_cells=150)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=10)
    sc.pp.neighbors(adata, n_neighbors=10)
    expected = adata.copy()
    sc.tl.umap(expected, min_dist=0.3, random_state=2)
    result = Umap(min_dist=0.3, seed=2, color_by=["cell_type", "label"])(adata)
    np.testing.assert_allclose(result.obsm["X_umap"], expected.obsm["X_umap"], rtol=1e-5)
    figure = Umap(color_by=["cell_type", "label"]).figures(result)["umap"]
    assert [ax.get_title() for ax in figure.axes if ax.get_title()] == ["cell_type", "label"]


def test_needs_neighbors(make_adata):
    with pytest.raises(DataError, match="neighbors"):
        Umap()(make_adata())


def test_seed_changes_the_embedding_and_none_acts_as_zero(make_adata):
    adata = make_adata(n_cells=150)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=10)
    sc.pp.neighbors(adata, n_neighbors=10)
    embedded = {seed: Umap(seed=seed)(adata.copy()).obsm["X_umap"] for seed in (0, 1)}
    np.testing.assert_array_equal(Umap(seed=1)(adata.copy()).obsm["X_umap"], embedded[1])
    assert not np.allclose(embedded[0], embedded[1])
    np.testing.assert_array_equal(Umap()(adata.copy()).obsm["X_umap"], embedded[0])
