"""highly_variable_genes against scanpy called directly: flag, subset, seurat_v3 on counts, batches."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from grnx_core.errors import DataError, GrnxError
from grnx_plugins.preprocess.highly_variable_genes import HighlyVariableGenes


def as_array(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def test_flags_like_scanpy(counts_adata):
    sc.pp.normalize_total(counts_adata, target_sum=10_000)
    sc.pp.log1p(counts_adata)
    expected = counts_adata.copy()
    sc.pp.highly_variable_genes(expected, n_top_genes=25)
    result = HighlyVariableGenes(n_top_genes=25)(counts_adata)
    assert result.n_vars == expected.n_vars
    np.testing.assert_array_equal(result.var["highly_variable"], expected.var["highly_variable"])
    assert result.var["highly_variable"].sum() == 25


def test_subset_keeps_counts_of_the_kept_genes(make_adata):
    adata = make_adata()
    counts, genes = adata.X.toarray(), list(adata.var_names)
    adata.layers["counts"] = adata.X.copy()
    sc.pp.log1p(adata)
    expected = adata.copy()
    sc.pp.highly_variable_genes(expected, n_top_genes=20, batch_key="batch", subset=True)
    result = HighlyVariableGenes(n_top_genes=20, batch_key="batch", subset=True)(adata)
    assert list(result.var_names) == list(expected.var_names) and result.n_vars == 20
    kept = [genes.index(g) for g in result.var_names]
    np.testing.assert_array_equal(as_array(result.layers["counts"]), counts[:, kept])
    # All genes' counts stay in raw, for tokenizers that rank every expressed gene.
    assert list(result.raw.var_names) == genes
    np.testing.assert_array_equal(as_array(result.raw.X), counts)


def test_seurat_v3_reads_the_counts_layer(make_adata):
    pytest.importorskip("skmisc", reason="scanpy's seurat_v3 flavour needs scikit-misc (not installed)")
    adata = make_adata()
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    expected = adata.copy()
    sc.pp.highly_variable_genes(expected, n_top_genes=15, flavor="seurat_v3", layer="counts")
    result = HighlyVariableGenes(n_top_genes=15, flavor="seurat_v3")(adata)
    np.testing.assert_array_equal(result.var["highly_variable"], expected.var["highly_variable"])
    np.testing.assert_allclose(result.var["variances_norm"], expected.var["variances_norm"])


def test_seurat_v3_without_scikit_misc_says_what_to_install(make_adata, monkeypatch):
    # None in sys.modules makes `import skmisc` fail as if it were not installed
    monkeypatch.setitem(sys.modules, "skmisc", None)
    monkeypatch.setitem(sys.modules, "skmisc.loess", None)
    adata = make_adata()
    with pytest.raises(ImportError, match="skmisc"):  # what scanpy alone says in that case
        sc.pp.highly_variable_genes(adata.copy(), n_top_genes=15, flavor="seurat_v3")
    with pytest.raises(GrnxError, match="needs the scikit-misc package.*pip install scikit-misc"):
        HighlyVariableGenes(flavor="seurat_v3")(adata)


def test_errors(make_adata):
    adata = make_adata()
    with pytest.raises(DataError, match="batch_key is 'library'"):
        HighlyVariableGenes(batch_key="library")(adata.copy())
    sc.pp.log1p(adata)
    with pytest.raises(DataError, match="raw integer counts"):
        HighlyVariableGenes(flavor="seurat_v3")(adata)
