"""scale against scanpy called directly; sparse and dense input agree."""

from __future__ import annotations

import numpy as np
import scanpy as sc
import scipy.sparse as sp

from grnx_plugins.preprocess.scale import Scale


def as_array(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def test_matches_scanpy(counts_adata):
    sc.pp.log1p(counts_adata)
    expected = counts_adata.copy()
    sc.pp.scale(expected, max_value=3)
    result = Scale(max_value=3)(counts_adata)
    np.testing.assert_allclose(as_array(result.X), as_array(expected.X), rtol=1e-5, atol=1e-6)
    assert as_array(result.X).max() <= 3 + 1e-6
    np.testing.assert_allclose(result.var["std"], expected.var["std"], rtol=1e-6)


def test_sparse_and_dense_agree(make_adata):
    sparse, dense = make_adata(), make_adata(dense=True)
    for adata in (sparse, dense):
        sc.pp.log1p(adata)
        Scale(max_value=None)(adata)
    np.testing.assert_allclose(as_array(sparse.X), as_array(dense.X), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(as_array(dense.X).mean(axis=0), 0, atol=1e-5)
