"""regress_out against scanpy called directly, and its error for a missing covariate."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from grnx_core.errors import DataError
from grnx_plugins.preprocess.regress_out import RegressOut


def as_array(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def test_matches_scanpy(counts_adata):
    adata = counts_adata[:, :40].copy()
    adata.obs["total_counts"] = as_array(adata.X).sum(axis=1)
    adata.layers["counts"] = adata.X.copy()
    sc.pp.log1p(adata)
    expected = adata.copy()
    sc.pp.regress_out(expected, keys=["total_counts"], n_jobs=1)
    result = RegressOut(keys=["total_counts"], n_jobs=1)(adata)
    np.testing.assert_allclose(as_array(result.X), as_array(expected.X), rtol=1e-5, atol=1e-5)
    # Residuals of a least-squares fit on [1, total_counts] are orthogonal to the covariate.
    centred = result.obs["total_counts"].to_numpy() - result.obs["total_counts"].mean()
    residual_means = as_array(result.X) - as_array(result.X).mean(axis=0)
    assert np.abs(centred @ residual_means).max() / (np.abs(centred).sum()) < 1e-3
    np.testing.assert_array_equal(as_array(result.layers["counts"]), as_array(counts_adata[:, :40].X))


def test_missing_covariate_is_a_clear_error(make_adata):
    with pytest.raises(DataError, match=r"keys is 'pct_counts_mt'.*qc_filter|keys is 'pct_counts_mt'"):
        RegressOut(keys=["pct_counts_mt"])(make_adata())
