"""synthetic source: planted network recovered by Pearson, disease rewiring, NB counts, determinism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from sklearn.metrics import average_precision_score

from grnx_core import RunContext
from grnx_plugins.data.synthetic import Synthetic


def pair_labels(genes, edges):
    """Undirected truth matrix for the upper triangle of the gene x gene grid."""
    index = {g: i for i, g in enumerate(genes)}
    truth = np.zeros((len(genes), len(genes)), dtype=bool)
    for source, target in zip(edges["source"], edges["target"]):
        truth[index[source], index[target]] = truth[index[target], index[source]] = True
    return truth


@pytest.fixture(scope="module")
def simulated():
    source = Synthetic(n_cells=3000, n_genes=60, n_regulators=12, n_rewired=6, n_gained=4, seed=7)
    return source, source.load()


def test_counts_layout(simulated):
    source, adata = simulated
    assert adata.shape == (3000, 60) and sp.isspmatrix_csr(adata.X)
    counts = adata.layers["counts"]
    assert counts.dtype == np.float32 and np.all(np.mod(counts.data, 1) == 0) and counts.data.min() > 0
    assert not np.shares_memory(adata.X.data, counts.data)
    assert set(adata.obs.columns) >= {"cell_type", "disease", "donor", "batch", "depth"}
    # Donors are nested in one disease label and one batch each.
    per_donor = adata.obs.groupby("donor", observed=True)[["disease", "batch"]].nunique()
    assert (per_donor == 1).all().all()
    # Sequencing depth drives the library size.
    totals = np.asarray(counts.sum(axis=1)).ravel()
    assert pd.Series(totals).corr(adata.obs["depth"].reset_index(drop=True), method="spearman") > 0.6


def test_negative_binomial_overdispersion():
    # One gene, no regulation effect: variance/mean of counts at fixed depth approaches 1 + mu/size.
    source = Synthetic(
        n_cells=20000,
        n_genes=3,
        n_regulators=1,
        n_groups=1,
        group_effect=0.0,
        donor_effect=0.0,
        batch_effect=0.0,
        n_rewired=0,
        n_gained=0,
        noise=0.01,
        depth_sd=0.0,
        dispersion=2.0,
        mean_depth=300.0,
        effect_size=0.01,
        n_batches=1,
    )
    counts = source.load().layers["counts"].toarray()
    mean, variance = counts.mean(axis=0), counts.var(axis=0)
    np.testing.assert_allclose(variance / mean, 1 + mean / 2.0, rtol=0.1)


def test_ground_truth_is_the_planted_dag(simulated):
    source, adata = simulated
    edges = source.ground_truth()
    assert list(edges.columns) == ["source", "target", "sign"] and set(edges["sign"]) == {-1, 1}
    order = {g: i for i, g in enumerate(adata.var_names)}
    assert all(order[s] < order[t] for s, t in zip(edges["source"], edges["target"]))  # acyclic
    assert adata.var.loc[edges["source"].unique(), "regulator"].all()
    pd.testing.assert_frame_equal(adata.uns["synthetic"]["network"][["source", "target", "sign"]], edges)
    disease = adata.uns["synthetic"]["disease_edges"]
    assert (disease["change"] == "flipped").sum() == 6 and (disease["change"] == "gained").sum() == 4
    flipped = disease[disease["change"] == "flipped"]
    assert (flipped["control_sign"] == -flipped["disease_sign"]).all()
    truth = Synthetic(
        n_cells=3000,
        n_genes=60,
        n_regulators=12,
        n_rewired=6,
        n_gained=4,
        seed=7,
        ground_truth_edges="disease",
    ).ground_truth()
    assert len(truth) == 10 and set(truth.columns) == {"source", "target", "sign"}


def test_pearson_extractor_recovers_the_planted_network(simulated):
    from grnx_plugins.extractors.pearson import PearsonExtractor

    source, adata = simulated
    adata = adata.copy()
    sc.pp.normalize_total(adata, target_sum=10_000)
    sc.pp.log1p(adata)
    interactions = PearsonExtractor().extract(RunContext(adata=adata))
    genes = list(adata.var_names)
    truth = pair_labels(genes, source.ground_truth())
    index = {g: i for i, g in enumerate(genes)}
    rows = interactions.table["source"].map(index).to_numpy()
    cols = interactions.table["target"].map(index).to_numpy()
    labels = truth[rows, cols]
    assert len(labels) == len(genes) * (len(genes) - 1) // 2  # every undirected pair scored
    auprc = average_precision_score(labels, interactions.table["score"])
    random_baseline = labels.mean()
    assert auprc > 0.4 and auprc > 6 * random_baseline, (auprc, random_baseline)


def test_disease_rewiring_shows_in_correlations(simulated):
    _, adata = simulated
    adata = adata.copy()
    sc.pp.normalize_total(adata, target_sum=10_000)
    sc.pp.log1p(adata)
    expression = pd.DataFrame(adata.X.toarray(), columns=adata.var_names)
    is_disease = (adata.obs["disease"] == "disease").to_numpy()
    disease_corr, control_corr = expression[is_disease].corr(), expression[~is_disease].corr()
    edges = adata.uns["synthetic"]["disease_edges"]
    difference = disease_corr - control_corr
    # A flipped edge's correlation moves toward its disease sign (its marginal sign can be masked by
    # other parents of the target, so the change is what is checked); gained edges gain correlation.
    for source, target, sign in zip(edges["source"], edges["target"], edges["disease_sign"]):
        assert np.sign(difference.loc[source, target]) == sign, (source, target)
    # Ranking pairs by |corr(disease) - corr(control)| puts the rewired edges on top.
    genes = list(adata.var_names)
    truth = pair_labels(genes, edges)
    upper = np.triu_indices(len(genes), k=1)
    auprc = average_precision_score(truth[upper], np.abs(difference.to_numpy())[upper])
    assert auprc > 10 * truth[upper].mean(), (auprc, truth[upper].mean())


def test_seeded_and_chunked():
    small = dict(n_cells=2500, n_genes=2000, n_regulators=50, mean_depth=2000.0)  # 2,000 cells per chunk
    first, again = Synthetic(**small).load(), Synthetic(**small).load()
    assert (first.X != again.X).nnz == 0 and first.obs.equals(again.obs)
    other = Synthetic(**small, seed=1).load()
    assert (first.X != other.X).nnz > 0
    # Both chunks hold data and the matrix is sparse (CSR) with realistic zeros.
    assert first.X[:2000].nnz > 0 and first.X[2000:].nnz > 0
    assert first.X.nnz / np.prod(first.shape) < 0.7


@pytest.mark.slow
def test_one_million_cells():
    import resource
    import time

    start = time.perf_counter()
    adata = Synthetic(n_cells=1_000_000, n_genes=100, n_regulators=20, mean_depth=1000.0).load()
    elapsed = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    assert adata.n_obs == 1_000_000 and sp.isspmatrix_csr(adata.X)
    assert elapsed < 300 and peak_gb < 8, (elapsed, peak_gb)
