"""qc_filter against the same scanpy calls made directly; errors for impossible QC."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from grnx_core.errors import DataError
from grnx_plugins.preprocess.qc_filter import QcFilter


def as_array(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def scanpy_qc(adata, min_genes, max_counts, max_pct_mt, min_cells):
    adata = adata.copy()
    adata.var["mt"] = adata.var_names.str.startswith("MT-")
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mt"], percent_top=None, log1p=False, inplace=True)
    keep = (
        (adata.obs["n_genes_by_counts"] >= min_genes)
        & (adata.obs["total_counts"] <= max_counts)
        & (adata.obs["pct_counts_mt"] <= max_pct_mt)
    )
    adata = adata[keep.to_numpy()].copy()
    sc.pp.filter_genes(adata, min_cells=min_cells)
    return adata


def test_matches_scanpy(counts_adata):
    totals = as_array(counts_adata.X).sum(axis=1)
    genes = (as_array(counts_adata.X) > 0).sum(axis=1)
    params = dict(
        min_genes=int(np.quantile(genes, 0.1)),
        max_counts=int(np.quantile(totals, 0.9)),
        max_pct_mt=8.0,
        min_cells=40,
    )
    expected = scanpy_qc(counts_adata, **params)
    result = QcFilter(**params)(counts_adata)
    assert list(result.obs_names) == list(expected.obs_names)
    assert list(result.var_names) == list(expected.var_names)
    assert 0 < result.n_obs < counts_adata.n_obs and 0 < result.n_vars < counts_adata.n_vars
    np.testing.assert_allclose(result.obs["pct_counts_mt"], expected.obs["pct_counts_mt"], rtol=1e-5)
    np.testing.assert_array_equal(as_array(result.X), as_array(expected.X))
    summary = result.uns["qc_filter"]
    assert summary["n_cells_out"] == expected.n_obs and summary["n_genes_out"] == expected.n_vars
    assert summary["cells_failing_max_counts"] == int((totals > params["max_counts"]).sum())


def test_ribosomal_share_and_symbol_column(make_adata):
    adata = make_adata()
    adata.var["symbol"] = adata.var_names
    adata.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    counts = adata.X.toarray()
    ribo_share = 100 * counts[:, 4:8].sum(axis=1) / counts.sum(axis=1)
    limit = float(np.median(ribo_share))
    result = QcFilter(max_pct_ribo=limit, gene_symbol_column="symbol")(adata)
    assert result.n_obs == int((ribo_share <= limit).sum())
    assert result.var["ribo"].sum() == 4 and result.var["mt"].sum() == 4


def test_nothing_left_is_a_clear_error(make_adata):
    with pytest.raises(DataError, match=r"no cell passes QC.*min_genes=240"):
        QcFilter(min_genes=10_000)(make_adata())
    with pytest.raises(DataError, match="no gene is detected in min_cells=100000"):
        QcFilter(min_cells=100_000)(make_adata())


def test_non_integer_counts_and_missing_mito_genes(make_adata):
    adata = make_adata()
    sc.pp.normalize_total(adata)
    with pytest.raises(DataError, match="needs raw integer counts"):
        QcFilter(min_genes=1)(adata)
    adata = make_adata()
    with pytest.raises(DataError, match="no gene name starts with 'mt-'"):
        QcFilter(max_pct_mt=5, mt_prefix="mt-")(adata)
