"""pearson and spearman extractors against numpy / scipy on dense and sparse data."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import spearmanr

from grnx_core import CellSample, DataError, RunContext
from grnx_plugins.extractors.pearson import PearsonExtractor, correlation_matrix
from grnx_plugins.extractors.spearman import SpearmanExtractor


def _adata(sparse: bool, seed: int = 0) -> anndata.AnnData:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.gamma(1.0, 1.0, size=(1, 12)), size=(300, 12)).astype(np.float64)
    counts[:, 3] = counts[:, 2] * 2 + rng.poisson(0.5, 300)  # a planted strong pair
    counts[:, 11] = 0  # a gene that is never expressed
    obs = pd.DataFrame(
        {"group": np.where(np.arange(300) < 150, "AD", "control")}, index=[f"c{i}" for i in range(300)]
    )
    X = sp.csr_matrix(counts) if sparse else counts
    return anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(12)]))


@pytest.mark.parametrize("sparse", [False, True])
def test_correlation_equals_numpy(sparse):
    adata = _adata(sparse)
    dense = adata.X.toarray() if sparse else adata.X
    expected = np.corrcoef(dense[:, :11], rowvar=False)
    result = correlation_matrix(adata.X)
    assert np.allclose(result[:11, :11], expected, atol=1e-12)
    assert np.all(result[11, :11] == 0) and result[11, 11] == 1


def test_extractor_ranks_by_magnitude_and_keeps_the_sign():
    adata = _adata(False)
    interactions = PearsonExtractor().extract(RunContext(adata=adata))
    table = interactions.table
    assert len(table) == 66 and not interactions.directed
    assert set(table.iloc[0][["source", "target"]]) == {"g2", "g3"}
    assert (np.diff(table["score"]) <= 0).all()
    expected = np.corrcoef(adata.X[:, :11], rowvar=False)
    row = table.iloc[5]
    i, j = int(row["source"][1:]), int(row["target"][1:])
    assert row["score"] == pytest.approx(abs(expected[i, j])) and row["sign"] == np.sign(expected[i, j])


def test_group_difference_equals_difference_of_correlations():
    adata = _adata(True)
    extractor = PearsonExtractor(group_key="group", case="AD", control="control", rank_by="value")
    table = extractor.extract(RunContext(adata=adata)).table
    dense = adata.X.toarray()
    difference = correlation_matrix(dense[:150]) - correlation_matrix(dense[150:])
    for _, row in table.head(10).iterrows():
        i, j = int(row["source"][1:]), int(row["target"][1:])
        assert row["score"] == pytest.approx(difference[i, j], abs=1e-12)


def test_only_sampled_cells_are_used():
    adata = _adata(False)
    sample = CellSample(indices=np.arange(0, 300, 3), weights=np.ones(100), n_cells_total=300)
    table = PearsonExtractor(rank_by="value").extract(RunContext(adata=adata, sample=sample)).table
    expected = np.corrcoef(adata.X[::3, :11], rowvar=False)
    top = table.iloc[0]
    assert top["score"] == pytest.approx(expected[int(top["source"][1:]), int(top["target"][1:])])


def test_spearman_equals_scipy():
    adata = _adata(False, seed=3)
    table = SpearmanExtractor(rank_by="value").extract(RunContext(adata=adata)).table
    expected = spearmanr(adata.X[:, :11]).statistic
    for _, row in table.head(20).iterrows():
        i, j = int(row["source"][1:]), int(row["target"][1:])
        if i < 11 and j < 11:
            assert row["score"] == pytest.approx(expected[i, j], abs=1e-12)


def test_group_errors_are_clear():
    adata = _adata(False)
    with pytest.raises(DataError, match="set params.case and params.control"):
        PearsonExtractor(group_key="group").extract(RunContext(adata=adata))
    with pytest.raises(DataError, match="case group 'High' of obs\\['group'\\] has 0 cells"):
        PearsonExtractor(group_key="group", case="High", control="control").extract(RunContext(adata=adata))
    with pytest.raises(DataError, match="needs obs column 'disease'"):
        PearsonExtractor(group_key="disease", case="a", control="b").extract(RunContext(adata=adata))


def _constant(sparse: bool, value: float = 0.0) -> anndata.AnnData:
    X = np.full((20, 4), value)
    X[:, 0] = np.arange(20)  # one gene varies: still no pair to rank
    return anndata.AnnData(
        X=sp.csr_matrix(X) if sparse else X,
        obs=pd.DataFrame({"group": ["AD", "control"] * 10}, index=[f"c{i}" for i in range(20)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(4)]),
    )


@pytest.mark.parametrize("extractor", [PearsonExtractor, SpearmanExtractor])
@pytest.mark.parametrize("sparse", [False, True])
def test_data_where_no_pair_of_genes_varies_is_refused(extractor, sparse):
    """An all-zero count matrix used to give a 'top pairs' list of zeros."""
    zeros = _constant(sparse)
    zeros.X = sp.csr_matrix(zeros.shape) if sparse else np.zeros(zeros.shape)
    with pytest.raises(
        DataError, match=rf"extractor '{extractor.name}' on X: 0 of the 4 genes vary across the 20 cells"
    ):
        extractor().extract(RunContext(adata=zeros))
    with pytest.raises(DataError, match=r"1 of the 4 genes varies"):
        extractor().extract(RunContext(adata=_constant(sparse, 3.0)))
    grouped = extractor(group_key="group", case="AD", control="control")
    with pytest.raises(DataError, match=r"on X of the case group \(group == 'AD'\): 1 of the 4 genes varies"):
        grouped.extract(RunContext(adata=_constant(sparse)))


@pytest.mark.parametrize("sparse", [False, True])
def test_nan_expression_is_refused(sparse):
    adata = _adata(False)
    adata.X[[4, 9], 1] = np.nan
    if sparse:
        adata.X = sp.csr_matrix(adata.X)
    with pytest.raises(
        DataError, match=r"X holds 2 NaN or infinite values in 2 cells \(e.g. 'c4', 'c9'\).*qc_filter"
    ):
        PearsonExtractor().extract(RunContext(adata=adata))


def test_groups_with_identical_correlations_are_refused():
    adata = _adata(False)
    twins = anndata.concat([adata[:50], adata[:50]])
    twins.obs_names = [f"c{i}" for i in range(100)]
    twins.obs["group"] = ["AD"] * 50 + ["control"] * 50
    extractor = PearsonExtractor(group_key="group", case="AD", control="control")
    with pytest.raises(DataError, match=r"corr\(case\) - corr\(control\) is 0 for every pair"):
        extractor.extract(RunContext(adata=twins))
