"""log1p against scanpy called directly, on sparse and dense input."""

from __future__ import annotations

import numpy as np
import scanpy as sc
import scipy.sparse as sp

from grnx_plugins.preprocess.log1p import Log1p


def as_array(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def test_matches_scanpy(counts_adata):
    expected = counts_adata.copy()
    sc.pp.log1p(expected, base=2)
    original = as_array(counts_adata.X).copy()
    result = Log1p(base=2)(counts_adata)
    np.testing.assert_allclose(as_array(result.X), as_array(expected.X), rtol=1e-6)
    np.testing.assert_allclose(as_array(result.X), np.log2(1 + original), rtol=1e-5)
    assert result.uns["log1p"]["base"] == 2
    np.testing.assert_array_equal(as_array(result.layers["counts"]), original)
