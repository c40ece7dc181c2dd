"""pca against scanpy called directly; highly variable genes used when flagged."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc

from grnx_core.errors import DataError
from grnx_plugins.preprocess.pca import Pca


def test_matches_scanpy(counts_adata):
    sc.pp.log1p(counts_adata)
    expected = counts_adata.copy()
    sc.pp.pca(expected, n_comps=10, random_state=3, mask_var=None)
    result = Pca(n_comps=10, seed=3)(counts_adata)
    np.testing.assert_allclose(result.obsm["X_pca"], expected.obsm["X_pca"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        result.uns["pca"]["variance_ratio"], expected.uns["pca"]["variance_ratio"], rtol=1e-5
    )


def test_sparse_and_dense_agree_up_to_sign(make_adata):
    sparse, dense = make_adata(), make_adata(dense=True)
    for adata in (sparse, dense):
        sc.pp.log1p(adata)
        Pca(n_comps=5)(adata)
    a, b = sparse.obsm["X_pca"], dense.obsm["X_pca"]
    np.testing.assert_allclose(np.abs(a), np.abs(b), rtol=1e-3, atol=1e-3)


def test_uses_highly_variable_genes(make_adata):
    adata = make_adata()
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=30)
    expected = adata.copy()
    sc.pp.pca(expected, n_comps=5, mask_var="highly_variable", random_state=0)
    result = Pca(n_comps=5)(adata)
    np.testing.assert_allclose(result.obsm["X_pca"], expected.obsm["X_pca"], rtol=1e-4, atol=1e-4)
    assert np.count_nonzero(np.abs(result.varm["PCs"]).sum(axis=1)) == 30


def test_components_fit_small_data_and_hvg_required(make_adata):
    adata = make_adata(n_cells=12, n_genes=30)
    sc.pp.log1p(adata)
    assert Pca(n_comps=50)(adata).obsm["X_pca"].shape == (12, 11)
    with pytest.raises(DataError, match="highly_variable"):
        Pca(use_highly_variable=True)(make_adata())


def test_seed_drives_the_randomized_solver_and_none_acts_as_zero(make_adata):
    adata = make_adata(dense=True)
    sc.pp.log1p(adata)
    pcs = {
        seed: Pca(n_comps=10, svd_solver="randomized", seed=seed)(adata.copy()).obsm["X_pca"]
        for seed in (0, 1)
    }
    np.testing.assert_array_equal(
        Pca(n_comps=10, svd_solver="randomized", seed=1)(adata.copy()).obsm["X_pca"], pcs[1]
    )
    assert np.abs(pcs[0] - pcs[1]).max() > 1e-2
    np.testing.assert_array_equal(
        Pca(n_comps=10, svd_solver="randomized")(adata.copy()).obsm["X_pca"], pcs[0]
    )
