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


# --- v2 options (issue 17): each defaults to off, and the default data is what it was before. ---

#: sha256 prefix of load() at default params (X, counts, obs, var, network, disease edges, truth),
#: computed with the source as it was before the v2 options (commit 016dd0d) under NumPy 2.4 and
#: recomputed identical from the current source. ``digest`` hashes values, not their storage
#: (index dtypes scipy chooses, object or string columns), so only a change of NumPy's random
#: streams moves it; then recompute it from that commit's plugins/data/synthetic.py.
DEFAULT_DIGEST = "f08440ccc5485526"


def frame_bytes(frame):
    """A frame's index, column names and values as bytes, independent of pandas' dtype choices."""

    def text(values):
        return "\0".join(map(str, values)).encode()

    parts = [text(frame.index), text(frame.columns)]
    for column in frame.columns:
        values = frame[column]
        if isinstance(values.dtype, pd.CategoricalDtype):
            parts += [text(values.cat.categories), values.cat.codes.to_numpy(np.int64).tobytes()]
        elif pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            parts.append(str(values.dtype).encode() + values.to_numpy().tobytes())
        else:
            parts.append(text(values))
    return b"\1".join(parts)


def digest(source):
    import hashlib

    adata, h = source.load(), hashlib.sha256()
    for matrix in (adata.X, adata.layers["counts"]):
        h.update(np.ascontiguousarray(matrix.data, dtype=np.float32).tobytes())
        h.update(np.asarray(matrix.indices, dtype=np.int64).tobytes())
        h.update(np.asarray(matrix.indptr, dtype=np.int64).tobytes())
    for frame in (
        adata.obs,
        adata.var,
        adata.uns["synthetic"]["network"],
        adata.uns["synthetic"]["disease_edges"],
        source.ground_truth(),
    ):
        h.update(frame_bytes(frame))
    return h.hexdigest()[:16]


def test_default_data_unchanged_by_the_v2_options():
    assert digest(Synthetic()) == DEFAULT_DIGEST
    assert Synthetic().obs_columns() == ["cell_type", "disease", "donor", "batch", "depth"]


def log_normalised(adata):
    adata = adata.copy()
    sc.pp.normalize_total(adata, target_sum=10_000)
    sc.pp.log1p(adata)
    return adata.X.toarray()


@pytest.mark.parametrize("effects", [{}, {"effect_size": 1.5, "noise": 1.0}])
def test_requested_depth_is_realised(effects):
    requested = Synthetic(n_cells=2000, depth="requested", **effects).load()
    totals = np.asarray(requested.layers["counts"].sum(axis=1)).ravel()
    assert abs(totals.mean() / 5000.0 - 1) < 0.05, totals.mean()
    # Per cell, the library size follows the drawn depth (NB noise only around it).
    assert np.corrcoef(totals, requested.obs["depth"])[0, 1] > 0.9
    # The default keeps the old, drifting depth.
    approximate = Synthetic(n_cells=2000, **effects).load().layers["counts"].sum(axis=1).mean()
    assert approximate < 0.85 * 5000.0


def test_de_genes_are_the_disease_mean_shift():
    source = Synthetic(n_cells=3000, n_genes=60, n_regulators=12, n_de_genes=5, de_fold_change=3.0, seed=7)
    adata = source.load()
    genes = np.array(adata.var_names)
    de_genes = adata.uns["synthetic"]["de_genes"]
    assert len(de_genes) == 5 and not adata.var.loc[de_genes, "regulator"].any()
    disease_edges = adata.uns["synthetic"]["disease_edges"]
    assert not set(de_genes) & (set(disease_edges["source"]) | set(disease_edges["target"]))
    # Brute force: the genes whose disease / control mean ratio stands out are exactly the DE genes,
    # and their ratio (relative to the other genes', which carries donor and depth differences) is
    # the fold change.
    counts = adata.layers["counts"].toarray()
    is_disease = (adata.obs["disease"] == "disease").to_numpy()
    ratio = counts[is_disease].mean(axis=0) / counts[~is_disease].mean(axis=0)
    assert set(genes[np.argsort(-np.abs(np.log(ratio)))[:5]]) == set(de_genes)
    is_de = np.isin(genes, de_genes)
    np.testing.assert_allclose(ratio[is_de] / np.median(ratio[~is_de]), 3.0, rtol=0.2)
    # The same network and disease edges as without the module.
    plain = Synthetic(n_cells=3000, n_genes=60, n_regulators=12, seed=7)
    pd.testing.assert_frame_equal(source.ground_truth(), plain.ground_truth())


def test_rare_state_cells_and_its_edges():
    params = dict(
        n_cells=4000, n_genes=60, n_regulators=12, rare_state_fraction=0.25, n_state_edges=6, seed=3
    )
    source = Synthetic(**params, ground_truth_edges="state")
    adata = source.load()
    assert set(source.obs_columns()) == set(adata.obs.columns) and "state" in adata.obs
    assert (adata.obs["state"] == "rare").sum() == 1000
    state_edges = source.ground_truth()
    pd.testing.assert_frame_equal(state_edges, adata.uns["synthetic"]["state_edges"])
    assert len(state_edges) == 6 and set(state_edges["sign"]) <= {-1, 1}
    order = {g: i for i, g in enumerate(adata.var_names)}
    assert all(order[s] < order[t] for s, t in zip(state_edges["source"], state_edges["target"]))
    planted = pd.concat([Synthetic(**params).ground_truth(), adata.uns["synthetic"]["disease_edges"]])
    assert not set(zip(state_edges["source"], state_edges["target"])) & set(
        zip(planted["source"], planted["target"])
    )
    # Brute force: the state edges are what changes the correlations between rare and common cells.
    expression = pd.DataFrame(log_normalised(adata), columns=adata.var_names)
    is_rare = (adata.obs["state"] == "rare").to_numpy()
    difference = expression[is_rare].corr() - expression[~is_rare].corr()
    for source_gene, target_gene, sign in state_edges.itertuples(index=False):
        assert np.sign(difference.loc[source_gene, target_gene]) == sign, (source_gene, target_gene)
    genes = list(adata.var_names)
    truth = pair_labels(genes, state_edges)
    upper = np.triu_indices(len(genes), k=1)
    auprc = average_precision_score(truth[upper], np.abs(difference.to_numpy())[upper])
    assert auprc > 10 * truth[upper].mean(), (auprc, truth[upper].mean())


def test_rare_state_is_rare_by_default_settings():
    adata = Synthetic(n_cells=2000, rare_state_fraction=0.015).load()
    assert (adata.obs["state"] == "rare").sum() == 30
    assert "state" not in Synthetic(n_cells=200).load().obs


def test_degenerate_options_are_refused():
    from grnx_core.errors import DataError

    with pytest.raises(ValueError, match="ground_truth_edges: state"):
        Synthetic(ground_truth_edges="state")
    with pytest.raises(ValueError, match="de_fold_change=1"):
        Synthetic(n_de_genes=3, de_fold_change=1.0)
    with pytest.raises(DataError, match="rare cells"):
        Synthetic(n_cells=20, rare_state_fraction=0.01).load()
    with pytest.raises(DataError, match="n_de_genes=500"):
        Synthetic(n_de_genes=500).load()


def test_interaction_label_needs_the_product():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    source = Synthetic(n_cells=3000, n_genes=60, n_regulators=12, interaction_label=True, seed=7)
    adata = source.load()
    assert set(source.obs_columns()) == set(adata.obs.columns)
    label = (adata.obs["interaction_label"] == "same").to_numpy()
    majority = max(label.mean(), 1 - label.mean())
    assert majority < 0.55  # balanced by construction
    expression = log_normalised(adata)
    standard = (expression - expression.mean(axis=0)) / expression.std(axis=0)
    genes = list(adata.var_names)
    edge = adata.uns["synthetic"]["interaction_edge"]
    parent, child = genes.index(edge["parent"]), genes.index(edge["child"])
    assert source.network.weights_control[parent, child] != 0  # a planted edge
    linear = LogisticRegression(max_iter=2000)
    on_genes = cross_val_score(linear, standard, label, cv=5).mean()
    assert on_genes < majority + 0.03, (on_genes, majority)
    product = np.column_stack([standard[:, [parent, child]], standard[:, parent] * standard[:, child]])
    with_product = cross_val_score(linear, product, label, cv=5).mean()
    assert with_product > majority + 0.1, (with_product, majority)


def test_interaction_label_is_learnt_by_an_mlp_not_by_a_linear_model():
    # The positive control of issue 17: on held-out cells a logistic regression on every gene stays
    # near the 50% baseline while a small MLP, which can form the parent x child product, clearly
    # beats it. Deep, nearly Poisson counts keep the innovations readable from the expression.
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    source = Synthetic(
        n_cells=8000,
        n_genes=20,
        n_regulators=4,
        noise=1.0,
        mean_depth=50_000.0,
        dispersion=100.0,
        interaction_label=True,
        seed=7,
    )
    adata = source.load()
    label = (adata.obs["interaction_label"] == "same").to_numpy()
    expression = log_normalised(adata)
    train_x, test_x, train_y, test_y = train_test_split(
        expression, label, test_size=0.3, random_state=0, stratify=label
    )
    mean, sd = train_x.mean(axis=0), train_x.std(axis=0)
    train_x, test_x = (train_x - mean) / sd, (test_x - mean) / sd
    linear = LogisticRegression(max_iter=2000).fit(train_x, train_y)
    linear_accuracy = balanced_accuracy_score(test_y, linear.predict(test_x))
    mlp = MLPClassifier(
        hidden_layer_sizes=(32,), alpha=0.01, max_iter=500, early_stopping=True, random_state=0
    )
    mlp_accuracy = balanced_accuracy_score(test_y, mlp.fit(train_x, train_y).predict(test_x))
    assert linear_accuracy < 0.6, linear_accuracy
    assert mlp_accuracy > 0.7 and mlp_accuracy > linear_accuracy + 0.15, (mlp_accuracy, linear_accuracy)


# --- named truths: every truth of one simulation, each what the counts were drawn from ---


def recovered_weights(activity, rows, n_regulators, first_child):
    """Least-squares regulator -> gene weights among ``rows``: each gene's activity regressed on
    an intercept and tanh of every regulator before it (the model's link; earlier genes are never
    descendants, so the fit is unbiased)."""
    regulators = np.tanh(activity[rows, :n_regulators])
    weights = np.zeros((n_regulators, activity.shape[1]))
    for child in range(first_child, activity.shape[1]):
        k = min(child, n_regulators)
        design = np.column_stack([np.ones(len(regulators)), regulators[:, :k]])
        coefficients, *_ = np.linalg.lstsq(design, activity[rows, child], rcond=None)
        weights[:k, child] = coefficients[1:]
    return weights


def edge_table(genes, weights, threshold):
    sources, targets = np.nonzero(np.abs(weights) > threshold)
    return {(genes[s], genes[t], int(np.sign(weights[s, t]))) for s, t in zip(sources, targets)}


def as_set(edges):
    return set(zip(edges["source"], edges["target"], edges["sign"].astype(int)))


def test_ground_truths_are_what_the_counts_were_drawn_from():
    # Brute force: with deep, nearly Poisson counts and no batch or depth spread, each cell's latent
    # activity is log(count / (depth / scale * share)) (the model in the module docstring). The
    # regulator -> gene weights regressed from it in control, disease and rare-state cells give the
    # planted network, the disease edges (weights that change) and the state edges.
    source = Synthetic(
        n_cells=30_000,
        n_genes=30,
        n_regulators=8,
        n_rewired=4,
        n_gained=4,
        n_de_genes=3,
        rare_state_fraction=0.25,
        n_state_edges=4,
        state_effect=0.3,
        mean_depth=1e9,
        depth_sd=0.0,
        dispersion=1e6,
        batch_effect=0.0,
        seed=11,
    )
    adata = source.load()
    counts = adata.layers["counts"].toarray().astype(np.float64)
    assert counts.min() > 1000  # no zeros: the log is the activity, up to tiny Poisson noise
    scale = np.exp(0.5 * source.effect_size**2 * (1 + source.noise**2))
    expected_at_zero = adata.obs["depth"].to_numpy()[:, None] / scale * adata.var["baseline_share"].to_numpy()
    activity = np.log(counts / expected_at_zero) / source.effect_size
    n_masters = max(1, source.n_regulators // 4)  # the first quarter of the regulators
    disease = (adata.obs["disease"] == "disease").to_numpy()
    rare = (adata.obs["state"] == "rare").to_numpy()

    def fit(rows):
        return recovered_weights(activity, rows, source.n_regulators, n_masters)

    control, in_disease, rare_control = fit(~disease & ~rare), fit(disease & ~rare), fit(~disease & rare)
    genes = np.array(adata.var_names)
    truths = source.ground_truths()
    assert set(truths) == {"planted", "disease", "state"}
    # Planted weights are at least 0.6 / sqrt(in-degree) (here > 0.3) and the fits err by < 0.1,
    # so the threshold 0.16 separates edges from non-edges; a disease or state change is at least 0.6.
    assert as_set(truths["planted"]) == edge_table(genes, control, 0.16)
    changed = np.abs(in_disease - control) > 0.3  # flipped or gained, with the disease weight's sign
    assert as_set(truths["disease"]) == edge_table(genes, np.where(changed, in_disease, 0.0), 0.16)
    assert as_set(truths["state"]) == edge_table(genes, rare_control - control, 0.3)


def test_ground_truths_name_each_truth_of_one_simulation():
    params = dict(n_cells=200, n_genes=40, n_regulators=8, rare_state_fraction=0.1, n_state_edges=3, seed=2)
    truths = Synthetic(**params).ground_truths()
    assert list(truths) == ["planted", "disease", "state"]
    for name, edges in truths.items():
        pd.testing.assert_frame_equal(edges, Synthetic(**params, ground_truth_edges=name).ground_truth())
        assert list(edges.columns) == ["source", "target", "sign"] and len(edges)
    # New frames each call: an evaluator editing one cannot change the source's truth.
    truths["planted"].drop(truths["planted"].index, inplace=True)
    assert len(Synthetic(**params).ground_truths()["planted"]) > 0
    # No rare state (or one without edges): no state truth, rather than an empty one.
    assert list(Synthetic(n_genes=40, n_regulators=8).ground_truths()) == ["planted", "disease"]
    no_edges = Synthetic(n_genes=40, n_regulators=8, rare_state_fraction=0.1, n_state_edges=0)
    assert list(no_edges.ground_truths()) == ["planted", "disease"]


# --- donor_design: balanced (issue 17) ---


def donor_table(adata):
    return adata.obs.groupby("donor", observed=True).agg(
        disease=("disease", "first"), batch=("batch", "first"), n_cells=("disease", "size")
    )


def test_balanced_donors():
    params = dict(n_cells=2010, n_donors=20, n_batches=3, seed=4)
    adata = Synthetic(**params, donor_design="balanced").load()
    per_donor = adata.obs.groupby("donor", observed=True)[["disease", "batch"]].nunique()
    assert (per_donor == 1).all().all()  # nested in one condition and one batch
    donors = donor_table(adata)
    assert len(donors) == 20 and (donors["disease"] == "disease").sum() == 10
    assert set(donors["n_cells"]) == {100, 101} and donors["n_cells"].sum() == 2010
    per_condition = adata.obs["disease"].value_counts()
    assert abs(per_condition["disease"] - per_condition["control"]) <= 1
    # Every batch holds as many disease as control donors (batch is not confounded with disease).
    per_batch = pd.crosstab(donors["batch"], donors["disease"])
    assert (per_batch["disease"] == per_batch["control"]).all() and (per_batch > 0).all().all()
    # Only the donors change: cell groups, depths and columns are those of the default design.
    default = Synthetic(**params).load()
    assert adata.obs["cell_type"].equals(default.obs["cell_type"])
    assert np.array_equal(adata.obs["depth"], default.obs["depth"])
    assert list(adata.obs.columns) == Synthetic(**params, donor_design="balanced").obs_columns()
    again = Synthetic(**params, donor_design="balanced").load()
    assert again.obs.equals(adata.obs) and (again.X != adata.X).nnz == 0
    # Another fraction: round(0.3 * 20) = 6 disease donors, each batch with both conditions.
    other = donor_table(
        Synthetic(n_cells=2000, n_donors=20, disease_fraction=0.3, donor_design="balanced").load()
    )
    assert (other["disease"] == "disease").sum() == 6 and set(other["n_cells"]) == {100}
    assert (pd.crosstab(other["batch"], other["disease"]) > 0).all().all()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"n_donors": 21}, "even n_donors"),
        ({"n_donors": 3, "disease_fraction": 0.4}, "at least 2 donors per condition"),
        ({"n_donors": 20, "disease_fraction": 0.05}, "at least 2 donors per condition"),
        ({"n_donors": 20, "n_batches": 11}, "n_batches must be at most"),
        ({"n_donors": 20, "n_cells": 10}, "donors without cells"),
    ],
)
def test_balanced_design_refuses_degenerate_settings(params, message):
    with pytest.raises(ValueError, match=message):
        Synthetic(donor_design="balanced", **params)


def test_donor_level_split_of_the_balanced_design():
    from grnx_plugins.preprocess.split import Split

    adata = Synthetic(n_cells=2000, n_donors=20, n_genes=20, n_regulators=4, donor_design="balanced").load()
    for seed in range(5):
        split = Split(donor_key="donor", label_key="disease", test_fraction=0.2, seed=seed)(adata.copy())
        side = split.obs["split"]
        assert (split.obs.groupby("donor", observed=True)["split"].nunique() == 1).all()  # no donor on both
        for name in ("train", "test"):
            assert set(split.obs.loc[side == name, "disease"]) == {"control", "disease"}, (seed, name)
        test_donors = donor_table(split[side == "test"])
        assert (test_donors["disease"] == "disease").sum() == 2 and len(test_donors) == 4
        assert (side == "test").sum() == 400  # equal donors, so exactly a fifth of the cells
