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
        DataError, match=r"X holds 2 NaN or infinite values in 2 cells \(e.g. 'c4', 'c9'\).*set params.layer"
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


# -- weighted correlation ---------------------------------------------------------------------


def _numpy_weighted_correlation(dense: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """numpy's reliability-weighted covariance (``aweights``), scaled to a correlation."""
    covariance = np.cov(dense, rowvar=False, aweights=weights)
    std = np.sqrt(np.diag(covariance))
    return covariance / np.outer(std, std)


@pytest.mark.parametrize("sparse", [False, True])
def test_weighted_correlation_equals_numpy_aweights(sparse):
    adata = _adata(sparse, seed=5)
    dense = adata.X.toarray() if sparse else adata.X
    weights = np.random.default_rng(1).gamma(0.5, 2.0, size=300)  # spread-out, WDS-like weights
    result = correlation_matrix(adata.X, weights=weights)
    expected = _numpy_weighted_correlation(dense[:, :11], weights)
    assert np.allclose(result[:11, :11], expected, atol=1e-12)
    assert not np.allclose(result[:11, :11], np.corrcoef(dense[:, :11], rowvar=False), atol=1e-3)
    equal = correlation_matrix(adata.X, weights=np.full(300, 3.7))
    assert np.allclose(equal, correlation_matrix(adata.X), atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True])
def test_integer_weights_equal_repeated_cells(sparse):
    adata = _adata(False, seed=6)
    weights = np.random.default_rng(2).integers(0, 4, size=300)  # zeros included: those cells drop out
    repeated = np.repeat(adata.X[:, :11], weights, axis=0)
    matrix = sp.csr_matrix(adata.X) if sparse else adata.X
    result = correlation_matrix(matrix, weights=weights.astype(float))
    assert np.allclose(result[:11, :11], np.corrcoef(repeated, rowvar=False), atol=1e-12)


def _weighted_sample(adata: anndata.AnnData, seed: int = 0) -> CellSample:
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(adata.n_obs, size=200, replace=False))
    return CellSample(indices=indices, weights=rng.gamma(0.5, 2.0, size=200), n_cells_total=adata.n_obs)


def _matrix_of(table: pd.DataFrame, genes: list[str]) -> np.ndarray:
    """The signed score of every pair of a ranked table, as a gene x gene matrix."""
    position = {gene: i for i, gene in enumerate(genes)}
    matrix = np.full((len(genes), len(genes)), np.nan)
    signed = table["score"] * table["sign"] if "sign" in table else table["score"]
    for source, target, value in zip(table["source"], table["target"], signed, strict=True):
        matrix[position[source], position[target]] = matrix[position[target], position[source]] = value
    return matrix


@pytest.mark.parametrize("sparse", [False, True])
def test_weighting_sample_uses_the_samplers_weights(sparse):
    adata = _adata(sparse, seed=7)
    sample = _weighted_sample(adata)
    dense = (adata.X.toarray() if sparse else adata.X)[sample.indices]
    genes, off_diagonal = list(adata.var_names), ~np.eye(11, dtype=bool)
    weighted = PearsonExtractor(weighting="sample").extract(RunContext(adata=adata, sample=sample))
    expected = _numpy_weighted_correlation(dense[:, :11], sample.weights)
    scores = _matrix_of(weighted.table, genes)[:11, :11]
    assert np.allclose(scores[off_diagonal], expected[off_diagonal], atol=1e-12)
    assert weighted.metadata["weighting"] == "sample"
    uniform = PearsonExtractor().extract(RunContext(adata=adata, sample=sample))
    expected_uniform = np.corrcoef(dense[:, :11], rowvar=False)
    scores_uniform = _matrix_of(uniform.table, genes)[:11, :11]
    assert np.allclose(scores_uniform[off_diagonal], expected_uniform[off_diagonal], atol=1e-12)
    assert not np.allclose(scores_uniform[off_diagonal], scores[off_diagonal], atol=1e-3)
    # Without a sampler every weight is 1: the plain correlation.
    no_sample = PearsonExtractor(weighting="sample").extract(RunContext(adata=adata))
    assert no_sample.metadata["weighting"] == "uniform"
    plain = PearsonExtractor().extract(RunContext(adata=adata)).table
    assert np.allclose(no_sample.table["score"], plain["score"], atol=1e-12)


def test_weighted_group_difference_weights_each_group_by_its_cells():
    adata = _adata(True, seed=8)
    sample = _weighted_sample(adata, seed=3)
    extractor = PearsonExtractor(
        group_key="group", case="AD", control="control", weighting="sample", rank_by="value"
    )
    table = extractor.extract(RunContext(adata=adata, sample=sample)).table
    dense = adata.X.toarray()[sample.indices][:, :11]
    case = adata.obs["group"].to_numpy()[sample.indices] == "AD"
    expected = _numpy_weighted_correlation(dense[case], sample.weights[case]) - _numpy_weighted_correlation(
        dense[~case], sample.weights[~case]
    )
    for _, row in table.head(15).iterrows():
        i, j = int(row["source"][1:]), int(row["target"][1:])
        assert row["score"] == pytest.approx(expected[i, j], abs=1e-12)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.nan, r"1 of the 200 cell weights are NaN, infinite or negative \(c\d+: nan\)"),
        (np.inf, r"NaN, infinite or negative \(c\d+: inf\)"),
        (-0.5, r"NaN, infinite or negative \(c\d+: -0.5\).*weighting: uniform"),
    ],
)
def test_degenerate_weights_are_refused(bad, message):
    adata = _adata(False)
    sample = _weighted_sample(adata)
    sample.weights[17] = bad
    with pytest.raises(DataError, match=r"extractor 'pearson' \(weighting: sample\).*" + message):
        PearsonExtractor(weighting="sample").extract(RunContext(adata=adata, sample=sample))
    # The same weights are harmless when the extractor does not weight.
    PearsonExtractor().extract(RunContext(adata=adata, sample=sample))


def test_all_zero_or_single_cell_weights_are_refused():
    adata = _adata(False)
    sample = _weighted_sample(adata)
    sample.weights[:] = 0.0
    with pytest.raises(DataError, match=r"all 200 cell weights are 0, so no cell would count"):
        PearsonExtractor(weighting="sample").extract(RunContext(adata=adata, sample=sample))
    sample.weights[5] = 1.0
    with pytest.raises(DataError, match=r"at least 2 cells of positive weight, got 1"):
        PearsonExtractor(weighting="sample").extract(RunContext(adata=adata, sample=sample))
    with pytest.raises(DataError, match=r"Pearson correlation: 3 cell weights for 300 cells"):
        correlation_matrix(adata.X, weights=np.ones(3))


# -- gene universe ----------------------------------------------------------------------------


def _two_halves() -> anndata.AnnData:
    """Genes 0-3 high in the first half, 4-7 in the second, 8-11 moderately high in both."""
    rng = np.random.default_rng(11)
    means = np.ones((400, 16))
    means[:200, 0:4] = 6.0
    means[200:, 4:8] = 6.0
    means[:, 8:12] = 4.0
    counts = rng.poisson(means).astype(np.float64)
    return anndata.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(400)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(16)]),
    )


def _genes_of(interactions) -> set[str]:
    return set(interactions.table["source"]) | set(interactions.table["target"])


def test_universe_on_all_cells_is_the_same_for_every_sample():
    adata = _two_halves()
    first = CellSample(indices=np.arange(0, 200, 2), weights=np.ones(100), n_cells_total=400)
    second = CellSample(indices=np.arange(200, 400, 2), weights=np.ones(100), n_cells_total=400)
    overall = np.asarray(adata.X.mean(axis=0)).ravel()
    expected = {f"g{i}" for i in np.argsort(-overall)[:4]}
    for universe_cells, same in (("all", True), ("sample", False)):
        extractor = PearsonExtractor(n_top_genes=4, universe_cells=universe_cells)
        universes = [_genes_of(extractor.extract(RunContext(adata=adata, sample=s))) for s in (first, second)]
        assert (universes[0] == universes[1]) is same, universe_cells
    # the default: the universe chosen on every cell, as the full-data run chooses it
    default = PearsonExtractor(n_top_genes=4)
    for sample in (first, second, None):
        interactions = default.extract(RunContext(adata=adata, sample=sample))
        assert _genes_of(interactions) == expected
        assert interactions.metadata["universe"] == "top_genes_of_all_cells"
    assert expected == {"g8", "g9", "g10", "g11"}
    sampled = PearsonExtractor(n_top_genes=4, universe_cells="sample").extract(
        RunContext(adata=adata, sample=first)
    )
    assert _genes_of(sampled) == {"g0", "g1", "g2", "g3"}


def test_universe_on_all_cells_refuses_nan_outside_the_sample():
    adata = _two_halves()
    adata.X = adata.X.toarray()
    adata.X[300, 2] = np.nan
    sample = CellSample(indices=np.arange(0, 200), weights=np.ones(200), n_cells_total=400)
    with pytest.raises(
        DataError, match=r"NaN or infinite values for 1 genes \(e.g. 'g2'\).*universe_cells: all"
    ):
        PearsonExtractor(n_top_genes=4).extract(RunContext(adata=adata, sample=sample))


@pytest.mark.parametrize("extractor", [PearsonExtractor, SpearmanExtractor])
def test_explicit_gene_universe_from_a_list_or_a_file(extractor, tmp_path):
    adata = _adata(False, seed=4)
    named = ["g7", "g2", "g3", "g5"]
    listed = extractor(genes=named, n_top_genes=2).extract(RunContext(adata=adata))
    assert _genes_of(listed) == set(named) and len(listed.table) == 6
    assert listed.metadata["universe"] == "genes" and extractor(genes=named).input_files() == []
    full = extractor().extract(RunContext(adata=adata)).table
    inside = full[full["source"].isin(named) & full["target"].isin(named)].reset_index(drop=True)
    assert np.allclose(listed.table["score"], inside["score"], atol=1e-12)
    file = tmp_path / "universe.txt"
    file.write_text("# the planted pair and two more\ng2\ng3\n\ng5  # a comment\ng7\n")
    from_file = extractor(genes=str(file))
    assert from_file.input_files() == [file]
    assert from_file.extract(RunContext(adata=adata)).table.equals(listed.table)


def test_a_gene_universe_with_genes_not_in_the_data_is_refused(tmp_path):
    adata = _adata(False)
    with pytest.raises(
        DataError,
        match=r"extractor 'pearson': 1 of the 3 genes of params.genes are not in the data \(e.g. 'TP53'",
    ):
        PearsonExtractor(genes=["g1", "g2", "TP53"]).extract(RunContext(adata=adata))
    with pytest.raises(DataError, match=r"gene list file .*missing.txt' not found"):
        PearsonExtractor(genes=str(tmp_path / "missing.txt")).extract(RunContext(adata=adata))


@pytest.mark.parametrize("extractor_class", [PearsonExtractor, SpearmanExtractor])
def test_case_variant_correlates_the_case_cells_only(extractor_class):
    """variant: case equals numpy/scipy on the case cells alone; the group column defaults to data.label_key."""
    adata = _adata(True)
    adata.obs.loc[adata.obs_names[::7], "group"] = "other"  # a third value, neither case nor control
    dense = adata.X.toarray()
    case = (adata.obs["group"] == "AD").to_numpy()
    if extractor_class is PearsonExtractor:
        expected = np.corrcoef(dense[case][:, :11], rowvar=False)
    else:
        expected = spearmanr(dense[case][:, :11]).statistic
    context = RunContext(adata=adata)
    context.roles.label_key = "group"
    interactions = extractor_class(variant="case", case="AD", rank_by="value").extract(context)
    assert interactions.metadata["n_case_cells"] == int(case.sum())
    for _, row in interactions.table.head(12).iterrows():
        i, j = int(row["source"][1:]), int(row["target"][1:])
        assert row["score"] == pytest.approx(expected[i, j], abs=1e-12)
    # the explicit variant equals the implicit one (group_key alone means case minus control)
    implicit = extractor_class(group_key="group", case="AD", control="control").extract(context).table
    explicit = (
        extractor_class(variant="case_minus_control", case="AD", control="control").extract(context).table
    )
    pd.testing.assert_frame_equal(implicit, explicit)


def test_variant_settings_that_would_be_ignored_are_refused():
    with pytest.raises(ValueError, match="variant 'all' correlates over every cell"):
        PearsonExtractor.Params(variant="all", group_key="group")
    with pytest.raises(ValueError, match="control 'control' would be ignored"):
        PearsonExtractor.Params(variant="case", case="AD", control="control")
    adata = _adata(False)
    with pytest.raises(DataError, match="set params.case to one of its values"):
        PearsonExtractor(variant="case", group_key="group").extract(RunContext(adata=adata))
    with pytest.raises(DataError, match="needs the column of the case/control label: set params.group_key"):
        PearsonExtractor(variant="case", case="AD").extract(RunContext(adata=adata))
