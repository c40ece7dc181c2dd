"""normalize_total against scanpy called directly, on sparse and dense counts."""

from __future__ import annotations

import numpy as np
import scanpy as sc
import scipy.sparse as sp

from grnx_plugins.preprocess.normalize_total import NormalizeTotal


def as_array(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def test_matches_scanpy_and_keeps_counts(counts_adata):
    expected = counts_adata.copy()
    sc.pp.normalize_total(expected, target_sum=10_000, key_added="size")
    original = as_array(counts_adata.X).copy()
    result = NormalizeTotal(target_sum=10_000, key_added="size")(counts_adata)
    np.testing.assert_allclose(as_array(result.X), as_array(expected.X), rtol=1e-6)
    np.testing.assert_allclose(result.obs["size"], expected.obs["size"])
    np.testing.assert_array_equal(as_array(result.layers["counts"]), original)
    np.testing.assert_allclose(as_array(result.X).sum(axis=1), 10_000, rtol=1e-4)


def test_existing_counts_layer_is_not_touched(make_adata):
    adata = make_adata()
    adata.layers["counts"] = adata.X.copy()
    before = adata.layers["counts"].toarray()
    NormalizeTotal()(adata)
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), before)
    # Default target: the median total over cells, as in scanpy.
    np.testing.assert_allclose(adata.X.sum(axis=1).A1, np.median(before.sum(axis=1)), rtol=1e-4)
