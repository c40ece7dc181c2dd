"""cscore extractor: the CS-CORE package's documented values, a brute-force reference, planted correlations."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import norm

from grnx_core import CellSample, DataError, RunContext
from grnx_plugins.extractors._cscore_irls import bytes_per_block_gene, fit_coexpression
from grnx_plugins.extractors.cscore import CscoreExtractor

#: ind_gene_pair from the CS-CORE R package (MIT), converted to text; see the file's header.
IND_GENE_PAIR = Path(__file__).with_name("cscore_ind_gene_pair.tsv")
#: The values CS-CORE documents for ind_gene_pair: tests/testthat/test-CSCORE_IRLS.R of
#: ChangSuBiostats/CS-CORE (expect_equal(est[1,2], 0.0078201236), expect_equal(p_value[1,2],
#: 0.96198097)), also in the examples of R/CSCORE_IRLS_base.R and R/CSCORE_IRLS_cpp.R.
IND_GENE_PAIR_EST = 0.0078201236
IND_GENE_PAIR_PVALUE = 0.96198097


def _ind_gene_pair() -> tuple[np.ndarray, np.ndarray]:
    table = pd.read_csv(IND_GENE_PAIR, sep="\t", comment="#")
    return table[["gene_1", "gene_2"]].to_numpy(), table["seq_depth"].to_numpy(dtype=np.float64)


def _adata(counts: np.ndarray, depth: np.ndarray, sparse: bool = False, obs: pd.DataFrame | None = None):
    """AnnData of ``counts`` plus a 'rest' gene holding the remaining counts, so each cell totals ``depth``."""
    rest = depth - counts.sum(axis=1)
    assert np.all(rest >= 0)
    matrix = np.column_stack([counts, rest]).astype(np.float32)
    genes = [f"g{j}" for j in range(counts.shape[1])] + ["rest"]
    obs = obs if obs is not None else pd.DataFrame(index=[f"c{i}" for i in range(len(depth))])
    X = sp.csr_matrix(matrix) if sparse else matrix
    adata = anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))
    adata.layers["counts"] = X.copy()
    return adata


def _simulate(rng, n_cells: int, log_cov: np.ndarray, log_mean: float = -8.2):
    """Poisson counts of latent log-normal expression times a log-normal depth (s ~ 3000)."""
    n_genes = len(log_cov)
    log_z = rng.multivariate_normal(np.full(n_genes, log_mean), log_cov, size=n_cells)
    depth = np.round(np.exp(rng.normal(8.0, 0.5, n_cells)))
    counts = rng.poisson(depth[:, None] * np.exp(log_z))
    return counts, depth


def _latent_correlation(log_cov: np.ndarray, j: int, k: int) -> float:
    """corr(z_j, z_k) of a multivariate log-normal z: what CS-CORE estimates."""
    return (np.exp(log_cov[j, k]) - 1) / np.sqrt((np.exp(log_cov[j, j]) - 1) * (np.exp(log_cov[k, k]) - 1))


def _brute_force_cscore(x: np.ndarray, s: np.ndarray, n_iter: int = 10, eps: float = 0.05):
    """CS-CORE written from the paper's moment equations one gene and one pair at a time (loops)."""
    n_genes = x.shape[1]
    mu, sigma2 = np.zeros(n_genes), np.zeros(n_genes)
    for j in range(n_genes):
        mu[j] = np.sum(s * x[:, j]) / np.sum(s**2)
        mean = s * mu[j]
        sigma2[j] = np.sum(s**2 * ((x[:, j] - mean) ** 2 - mean)) / np.sum(s**4)
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = mu**2 / sigma2
    iteration, delta = 0, np.inf
    while delta > eps and iteration <= n_iter:
        previous = theta.copy()
        median = np.median([t for t in theta if t > 0])
        for j in range(n_genes):
            w = s * mu[j] + s**2 * mu[j] ** 2 / median
            w = np.where(np.isfinite(w) & (w > 0), w, 1.0)
            mu[j] = np.sum(s * x[:, j] / w) / np.sum(s**2 / w)
            mean = s * mu[j]
            h = (mean**2 / median + mean) ** 2
            h = np.where(h > 0, h, 1.0)
            sigma2[j] = np.sum(s**2 * ((x[:, j] - mean) ** 2 - mean) / h) / np.sum(s**4 / h)
        with np.errstate(divide="ignore", invalid="ignore"):
            theta = mu**2 / sigma2
        iteration += 1
        logs = [abs(np.log(t / p)) for t, p in zip(theta, previous) if t > 0 and p > 0]
        delta = max(logs) if logs else -np.inf
    median = np.median([t for t in theta if t > 0])
    rho, statistic = np.eye(n_genes), np.full((n_genes, n_genes), np.nan)
    for j in range(n_genes):
        for k in range(n_genes):
            w_j = s * mu[j] + s**2 * mu[j] ** 2 / median
            w_k = s * mu[k] + s**2 * mu[k] ** 2 / median
            w_j, w_k = np.where(w_j > 0, w_j, 1.0), np.where(w_k > 0, w_k, 1.0)
            r_j, r_k = x[:, j] - s * mu[j], x[:, k] - s * mu[k]
            covariance = np.sum(s**2 * r_j * r_k / (w_j * w_k)) / np.sum(s**4 / (w_j * w_k))
            if j != k and sigma2[j] > 0 and sigma2[k] > 0:
                rho[j, k] = min(1.0, max(-1.0, covariance / np.sqrt(sigma2[j] * sigma2[k])))
            elif j != k:
                rho[j, k] = 0.0
            big_s_j, big_s_k = s * mu[j] + s**2 * sigma2[j], s * mu[k] + s**2 * sigma2[k]
            with np.errstate(divide="ignore", invalid="ignore"):
                value = np.sum(s**2 * r_j * r_k / (big_s_j * big_s_k)) / np.sqrt(
                    np.sum(s**4 / (big_s_j * big_s_k))
                )
            statistic[j, k] = value if np.isfinite(value) else np.nan
    return rho, statistic, mu, sigma2


# -- (1) the package's documented values and a brute-force reference --------------------------------


@pytest.mark.parametrize("sparse", [False, True])
def test_ind_gene_pair_reproduces_the_package_values(sparse):
    counts, depth = _ind_gene_pair()
    assert counts.shape == (1972, 2)  # as R/data.R documents ind_gene_pair
    fit = fit_coexpression(sp.csr_matrix(counts) if sparse else counts, depth, max_memory_bytes=2**28)
    assert fit.correlation[0, 1] == pytest.approx(IND_GENE_PAIR_EST, rel=1e-7)
    assert fit.pvalue[0, 1] == pytest.approx(IND_GENE_PAIR_PVALUE, rel=1e-7)


def test_extractor_on_ind_gene_pair_takes_depth_over_every_gene():
    counts, depth = _ind_gene_pair()
    adata = _adata(counts, depth, sparse=True)
    extractor = CscoreExtractor(genes=["g0", "g1"])
    interactions = extractor.extract(RunContext(adata=adata))
    row = interactions.table.iloc[0]
    assert len(interactions) == 1 and not interactions.directed
    assert extractor.output_direction() == "undirected"
    assert row["score"] == pytest.approx(abs(IND_GENE_PAIR_EST), rel=1e-7)
    assert row["pvalue"] == pytest.approx(IND_GENE_PAIR_PVALUE, rel=1e-7)
    assert row["pvalue"] == pytest.approx(2 * norm.sf(abs(row["statistic"])))
    # The universe's own totals as depth would not give the package's values (nor any estimate).
    with pytest.raises(DataError, match="positive variance estimate"):
        fit_coexpression(counts, counts.sum(axis=1).astype(np.float64), max_memory_bytes=2**28)


def test_blocks_match_a_brute_force_reference():
    rng = np.random.default_rng(5)
    log_cov = np.full((7, 7), 0.1) + np.diag(np.full(7, 0.4))
    log_cov[0, 1] = log_cov[1, 0] = 0.35
    log_cov[2, 3] = log_cov[3, 2] = -0.3
    counts, depth = _simulate(rng, 600, log_cov)
    counts[:, 5] = rng.poisson(depth * 2e-4)  # Poisson only: a variance estimate near or below 0
    counts[:, 6] = 0  # no counts
    rho, statistic, mu, sigma2 = _brute_force_cscore(counts.astype(np.float64), depth)
    n_genes, per_gene = counts.shape[1], bytes_per_block_gene(len(depth), len(np.unique(depth)))
    for genes_per_block in (2, 3, n_genes):  # memory for that many genes per block
        budget = 2 * 8.0 * n_genes**2 + genes_per_block * per_gene
        fit = fit_coexpression(sp.csc_matrix(counts), depth, max_memory_bytes=budget)
        assert np.allclose(fit.moments.mu, mu, rtol=1e-10) and np.allclose(
            fit.moments.sigma2, sigma2, rtol=1e-9
        )
        assert np.allclose(fit.correlation, rho, rtol=1e-9, atol=1e-12)
        assert np.allclose(fit.statistic, statistic, rtol=1e-9, atol=1e-12, equal_nan=True)
        assert np.array_equal(fit.correlation, fit.correlation.T)
    assert np.all(fit.correlation[6, :6] == 0) and np.isnan(fit.statistic[6, :6]).all()


def _scrambled_csc(counts: np.ndarray, rng) -> sp.csc_matrix:
    """CSC of ``counts`` in a non-canonical layout: rows unsorted, counts split over duplicate
    entries, explicit zeros stored, int64 values."""
    indptr, indices, data = [0], [], []
    for column in counts.T:
        rows = np.flatnonzero(column)
        split = rows[column[rows] >= 2][:5]  # a few counts stored as two entries
        zero_rows = np.flatnonzero(column == 0)[:3]  # a few zeros stored explicitly
        entry_rows = np.concatenate([rows, split, zero_rows])
        entry_values = np.concatenate([column[rows], np.zeros(len(split) + len(zero_rows), dtype=np.int64)])
        entry_values[np.searchsorted(rows, split)] -= 1
        entry_values[len(rows) : len(rows) + len(split)] = 1
        order = rng.permutation(len(entry_rows))
        indices.extend(entry_rows[order])
        data.extend(entry_values[order])
        indptr.append(len(indices))
    matrix = sp.csc_matrix(
        (np.array(data, dtype=np.int64), np.array(indices), np.array(indptr)), shape=counts.shape
    )
    assert not matrix.has_canonical_format
    return matrix


def test_cells_sharing_depths_and_any_sparse_layout_match_the_brute_force_reference():
    # Every weight depends on a cell only through its depth: here 400 cells share 4 depths, so the
    # sums over depths replace most sums over cells; the layouts must not change any count.
    rng = np.random.default_rng(7)
    log_cov = np.full((6, 6), 0.1) + np.diag(np.full(6, 0.4))
    log_cov[0, 1] = log_cov[1, 0] = 0.35
    depth = rng.choice([1500.0, 2500.0, 4000.0, 9000.0], size=400)
    log_z = rng.multivariate_normal(np.full(6, -8.2), log_cov, size=400)
    counts = rng.poisson(depth[:, None] * np.exp(log_z))
    rho, statistic, mu, sigma2 = _brute_force_cscore(counts.astype(np.float64), depth)
    for layout in (counts, sp.csr_matrix(counts.astype(np.float32)), _scrambled_csc(counts, rng)):
        fit = fit_coexpression(layout, depth, max_memory_bytes=2**26)
        assert np.allclose(fit.moments.mu, mu, rtol=1e-12) and np.allclose(
            fit.moments.sigma2, sigma2, rtol=1e-10
        )
        assert np.allclose(fit.correlation, rho, rtol=1e-10, atol=1e-13)
        assert np.allclose(fit.statistic, statistic, rtol=1e-10, atol=1e-13, equal_nan=True)


# -- (2) a planted correlation in simulated counts ----------------------------------------------


def test_recovers_a_planted_correlation_that_pearson_attenuates():
    rng = np.random.default_rng(0)
    log_cov = np.diag(np.full(6, 0.5))
    log_cov[0, 1] = log_cov[1, 0] = 0.4
    counts, depth = _simulate(rng, 4000, log_cov)
    truth = _latent_correlation(log_cov, 0, 1)  # 0.758
    extractor = CscoreExtractor(genes=[f"g{j}" for j in range(6)], rank_by="value")
    table = extractor.extract(RunContext(adata=_adata(counts, depth))).table
    pairs = {
        frozenset((a, b)): row for a, b, row in zip(table["source"], table["target"], table.itertuples())
    }
    planted = pairs[frozenset(("g0", "g1"))]
    assert table.iloc[0][["source", "target"]].tolist() == ["g0", "g1"]
    assert planted.score == pytest.approx(truth, abs=0.08)
    assert planted.pvalue < 1e-10
    normalised = np.log1p(counts / depth[:, None] * 1e4)
    pearson = np.corrcoef(normalised[:, 0], normalised[:, 1])[0, 1]
    assert pearson < truth - 0.3  # Poisson noise attenuates the naive estimate
    null = table[
        [frozenset((a, b)) != frozenset(("g0", "g1")) for a, b in zip(table["source"], table["target"])]
    ]
    assert np.abs(null["score"]).max() < 0.15
    assert (null["pvalue"] > 0.001).all()


# -- (3) bad input ------------------------------------------------------------------------------


def test_non_integer_negative_and_nan_values_are_refused():
    counts, depth = _ind_gene_pair()
    adata = _adata(counts[:200], depth[:200])
    normalised = adata.copy()
    del normalised.layers["counts"]
    normalised.X = normalised.X / normalised.X.sum(axis=1, keepdims=True) * 1e4
    with pytest.raises(DataError, match=r"X holds .* non-integer values .* raw UMI counts"):
        CscoreExtractor().extract(RunContext(adata=normalised))
    for value, kind in ((-1.0, "negative"), (np.nan, "NaN or infinite")):
        broken = adata.copy()
        broken.layers["counts"][3, 1] = value
        with pytest.raises(
            DataError, match=rf"layer 'counts' holds 1 {kind} values .* gene 'g1' in cell 'c3'"
        ):
            CscoreExtractor().extract(RunContext(adata=broken))
    with pytest.raises(DataError, match="layer 'raw' not found"):
        CscoreExtractor(layer="raw").extract(RunContext(adata=adata))


def test_genes_without_counts_score_zero_and_empty_data_is_refused():
    rng = np.random.default_rng(1)
    log_cov = np.diag(np.full(4, 0.5))
    log_cov[0, 1] = log_cov[1, 0] = 0.4
    counts, depth = _simulate(rng, 800, log_cov)
    counts[:, 3] = 0
    interactions = CscoreExtractor(genes=["g0", "g1", "g2", "g3"]).extract(
        RunContext(adata=_adata(counts, depth))
    )
    table = interactions.table
    silent = table[(table["source"] == "g3") | (table["target"] == "g3")]
    assert len(silent) == 3 and (silent["score"] == 0).all() and silent["pvalue"].isna().all()
    assert interactions.metadata["n_genes_without_counts"] == 1
    empty = anndata.AnnData(
        X=np.zeros((50, 4), dtype=np.float32), obs=pd.DataFrame(index=[f"c{i}" for i in range(50)])
    )
    with pytest.raises(DataError, match="at least 2 cells with counts"):
        CscoreExtractor().extract(RunContext(adata=empty))
    flat = _adata(rng.poisson(np.outer(depth, np.full(3, 3e-4))), depth)  # Poisson only: no co-expression
    with pytest.raises(DataError, match="positive variance estimate"):
        CscoreExtractor(genes=["g0", "g1", "g2"]).extract(RunContext(adata=flat))


def test_universe_memory_is_bounded():
    counts, depth = _ind_gene_pair()
    with pytest.raises(DataError, match=r"max_memory_gb .* Choose fewer genes"):
        CscoreExtractor(max_memory_gb=1e-6).extract(RunContext(adata=_adata(counts, depth)))


# -- universe and cells -------------------------------------------------------------------------


def test_top_genes_by_mean_normalised_count_and_sampled_cells():
    rng = np.random.default_rng(2)
    counts, depth = _simulate(rng, 600, np.diag(np.full(8, 0.5)))
    low, high = np.quantile(depth, [0.25, 0.75])
    counts[:, 6] = np.where(depth < low, counts[:, 6] + 6, 0)  # shallow cells only
    counts[:, 7] = np.where(depth > high, 6, 0)  # deep cells only: a high mean count, a low mean x / s
    adata = _adata(counts, depth)
    matrix = adata.layers["counts"].astype(np.float64)  # the genes and the 'rest' gene
    by_normalised = set(
        adata.var_names[np.argsort(-(matrix / matrix.sum(axis=1, keepdims=True)).mean(axis=0))[:3]]
    )
    by_count = set(adata.var_names[np.argsort(-matrix.mean(axis=0))[:3]])
    assert by_normalised != by_count
    assert set(CscoreExtractor(n_top_genes=3).extract(RunContext(adata=adata)).genes) == by_normalised
    sample = CellSample(indices=np.arange(0, 600, 2), weights=np.ones(300), n_cells_total=600)
    sampled = CscoreExtractor(genes=["g0", "g1"]).extract(RunContext(adata=adata, sample=sample))
    direct = fit_coexpression(counts[::2, :2], depth[::2], max_memory_bytes=2**28)
    assert sampled.table["score"].iloc[0] == pytest.approx(abs(direct.correlation[0, 1]), rel=1e-12)
    assert sampled.metadata["n_cells"] == 300


# -- (4) case minus control ---------------------------------------------------------------------


def test_case_minus_control_finds_the_pair_correlated_only_in_cases():
    rng = np.random.default_rng(3)
    correlated = np.diag(np.full(10, 0.5))
    correlated[0, 1] = correlated[1, 0] = 0.4
    case_counts, case_depth = _simulate(rng, 2500, correlated)
    control_counts, control_depth = _simulate(rng, 2500, np.diag(np.full(10, 0.5)))
    counts, depth = np.vstack([case_counts, control_counts]), np.concatenate([case_depth, control_depth])
    obs = pd.DataFrame({"status": ["AD"] * 2500 + ["control"] * 2500}, index=[f"c{i}" for i in range(5000)])
    adata = _adata(counts, depth, sparse=True, obs=obs)
    genes = [f"g{j}" for j in range(10)]
    extractor = CscoreExtractor(genes=genes, group_key="status", case="AD", control="control")
    interactions = extractor.extract(RunContext(adata=adata))
    table = interactions.table
    top = table.iloc[0]
    assert {top["source"], top["target"]} == {"g0", "g1"} and top["sign"] == 1
    assert top["score"] == pytest.approx(top["rho_case"] - top["rho_control"], abs=1e-12)
    assert top["rho_case"] == pytest.approx(_latent_correlation(correlated, 0, 1), abs=0.08)
    assert abs(top["rho_control"]) < 0.1
    assert top["pvalue"] < 1e-10
    # Null pairs (independent in both groups): the difference test is roughly calibrated.
    null = table.iloc[1:]
    assert 0.3 < null["pvalue"].median() < 0.7
    assert (null["pvalue"] < 0.01).mean() < 0.1
    assert interactions.metadata["case_n_cells"] == 2500 and interactions.metadata["control_n_cells"] == 2500
    by_statistic = CscoreExtractor(
        genes=genes, group_key="status", case="AD", control="control", difference="statistic"
    )
    assert set(by_statistic.extract(RunContext(adata=adata)).table.iloc[0][["source", "target"]]) == {
        "g0",
        "g1",
    }


def test_groups_are_checked():
    counts, depth = _ind_gene_pair()
    obs = pd.DataFrame({"status": ["a"] * 1972}, index=[f"c{i}" for i in range(1972)])
    adata = _adata(counts, depth, obs=obs)
    with pytest.raises(DataError, match="set params.case and params.control"):
        CscoreExtractor(group_key="status").extract(RunContext(adata=adata))
    with pytest.raises(DataError, match="control group 'b' of obs\\['status'\\] has 0 cells"):
        CscoreExtractor(group_key="status", case="a", control="b").extract(RunContext(adata=adata))
