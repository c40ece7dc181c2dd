"""grnboost2 and genie3 against arboreto's per-target function, across workers, on planted networks."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from grnx_core import DataError, GroundTruth, RunContext
from grnx_core.recipe import ExecutionSettings
from grnx_plugins.data.synthetic import Synthetic
from grnx_plugins.evaluators.auprc import AuprcEvaluator
from grnx_plugins.extractors._tree_regressions import arboreto_profile, run_regressions, target_seed
from grnx_plugins.extractors.genie3 import GENIE3Extractor
from grnx_plugins.extractors.grnboost2 import GRNBoost2Extractor

ONE_WORKER = ExecutionSettings(num_workers=1)


def _context(adata: anndata.AnnData, workers: int | None = 1, seed: int = 0) -> RunContext:
    return RunContext(adata=adata, seed=seed, execution=ExecutionSettings(num_workers=workers))


def _links(interactions) -> pd.Series:
    table = interactions.table
    return pd.Series(table["score"].to_numpy(), index=table["source"] + "->" + table["target"]).sort_index()


@pytest.fixture(scope="module")
def mdc(shared_data):
    """BEELINE mouse dendritic cells (log-normalised), 6 TFs + 6 other genes, 120 cells."""
    folder = shared_data / "scrna" / "beeline_mdc" / "Specific"
    if not (folder / "ExpressionData.csv").is_file():
        pytest.skip(f"BEELINE mDC data not found in {folder}")
    expression = pd.read_csv(folder / "ExpressionData.csv", index_col=0)
    tfs = pd.read_csv(folder / "TF.csv", index_col=0)["TF"].astype(str).tolist()
    chosen_tfs = [gene for gene in expression.index if gene in set(tfs)][:6]
    others = [gene for gene in expression.index if gene not in set(tfs)][:6]
    genes = [gene for gene in expression.index if gene in set(chosen_tfs + others)]
    cells = expression.columns[::3][:120]
    adata = anndata.AnnData(
        X=expression.loc[:, cells].to_numpy().T.copy(),
        obs=pd.DataFrame(index=cells.astype(str)),
        var=pd.DataFrame(index=expression.index.astype(str)),
    )
    return adata, genes, chosen_tfs


def _arboreto_links(adata, genes, tfs, regressor_type, kwargs, base_seed) -> pd.Series:
    """arboreto's ``infer_partial_network`` per target, on the data's matrix, with grnx's seeds."""
    from arboreto.core import EARLY_STOP_WINDOW_LENGTH, infer_partial_network, to_tf_matrix

    expression = adata[:, genes].X
    tf_matrix, tf_names = to_tf_matrix(expression, genes, tfs)
    frames = [
        infer_partial_network(
            regressor_type,
            kwargs,
            tf_matrix,
            tf_names,
            gene,
            expression[:, column],
            early_stop_window_length=EARLY_STOP_WINDOW_LENGTH,
            seed=target_seed(base_seed, gene),
        )
        for column, gene in enumerate(genes)
    ]
    links = pd.concat(frames)
    return pd.Series(links["importance"].to_numpy(), index=links["TF"] + "->" + links["target"]).sort_index()


def test_grnboost2_equals_arboreto_per_target(mdc):
    from arboreto.core import SGBM_KWARGS

    adata, genes, tfs = mdc
    extractor = GRNBoost2Extractor(genes=genes, tf_list=tfs, seed=11)
    interactions = extractor.extract(_context(adata))
    expected = _arboreto_links(adata, genes, tfs, "GBM", SGBM_KWARGS, 11)
    assert interactions.directed and extractor.output_direction() == "regulator -> target"
    assert interactions.genes == genes
    assert len(expected) > 40
    got = _links(interactions)
    assert list(got.index) == list(expected.index)
    np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), rtol=1e-12)
    assert interactions.metadata["tf_in_universe"] == 6 and interactions.metadata["n_targets_fitted"] == 12


def test_genie3_equals_arboreto_per_target(mdc):
    from arboreto.core import RF_KWARGS

    adata, genes, tfs = mdc
    # 20 trees instead of arboreto's 1,000 keep the test short; the kwargs are otherwise RF_KWARGS.
    interactions = GENIE3Extractor(genes=genes, tf_list=tfs, n_estimators=20, seed=3).extract(_context(adata))
    expected = _arboreto_links(adata, genes, tfs, "RF", {**RF_KWARGS, "n_estimators": 20}, 3)
    got = _links(interactions)
    assert list(got.index) == list(expected.index)
    np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), rtol=1e-12)


def _synthetic(n_cells: int = 500, n_genes: int = 20, n_regulators: int = 4, seed: int = 0):
    # No disease rewiring: the planted (control) network holds in every cell.
    source = Synthetic(
        n_cells=n_cells, n_genes=n_genes, n_regulators=n_regulators, n_rewired=0, n_gained=0, seed=seed
    )
    adata = source.load()
    counts = adata.layers["counts"].toarray().astype(np.float64)
    depth = counts.sum(axis=1, keepdims=True)
    adata.X = sp.csr_matrix(np.log1p(counts / np.maximum(depth, 1) * 1e4))
    truth = GroundTruth(edges=source.ground_truth(), directed=True, name="planted")
    return adata, truth


def test_recovers_the_planted_network_above_random():
    adata, truth = _synthetic()
    regulators = list(adata.var_names[adata.var["regulator"].to_numpy(bool)])
    results = {}
    for extractor in (
        GRNBoost2Extractor(tf_list=regulators),
        GENIE3Extractor(tf_list=regulators, n_estimators=30),
    ):
        interactions = extractor.extract(_context(adata))
        assert set(interactions.table["source"]) <= set(regulators)
        results[extractor.name] = interactions
    context = RunContext(ground_truth=truth, interactions=results)
    # Candidates: every ordered pair with a regulator as source, as the extractors were told.
    metrics = AuprcEvaluator(ground_truth={"source": "data"}, plot=False).evaluate(context).metrics
    for name in results:
        assert metrics[f"{name}/truth_genes/auprc"] > 3 * metrics[f"{name}/truth_genes/auprc_random"], metrics
        assert metrics[f"{name}/truth_genes/auroc"] > 0.75, metrics


@pytest.mark.slow
def test_same_result_with_one_and_two_workers():
    """Per-target seeds: splitting targets over Ray workers changes nothing (a local Ray starts:
    about 5 s on an idle machine, a minute on a loaded one, hence slow)."""
    pytest.importorskip("ray")
    adata, _ = _synthetic(n_cells=200, n_genes=12, n_regulators=3)
    one = GRNBoost2Extractor(seed=5).extract(_context(adata, workers=1))
    two = GRNBoost2Extractor(seed=5).extract(_context(adata, workers=2))
    pd.testing.assert_frame_equal(one.table, two.table)
    assert one.metadata == two.metadata


def test_small_work_without_a_worker_count_stays_in_process():
    """num_workers unset: a job shorter than Ray's start-up runs here, with the same result."""
    adata, _ = _synthetic(n_cells=100, n_genes=6, n_regulators=2)
    expression = adata.X.toarray()
    seeds = np.array([target_seed(0, gene) for gene in adata.var_names])
    columns = np.arange(adata.n_vars)
    regressor = arboreto_profile("grnboost2", None, early_stop_window=25)
    unset = run_regressions(
        regressor, expression, columns, columns, seeds, num_workers=None, ray_address=None
    )
    one = run_regressions(regressor, expression, columns, columns, seeds, num_workers=1, ray_address=None)
    assert unset[2]["ray"] is False and one[2]["ray"] is False
    np.testing.assert_array_equal(unset[0], one[0])


def test_seed_changes_the_fit_and_a_recipe_seed_fills_it():
    adata, _ = _synthetic(n_cells=200, n_genes=8, n_regulators=2)
    first = GRNBoost2Extractor(seed=1).extract(_context(adata))
    again = GRNBoost2Extractor(seed=1).extract(_context(adata))
    other = GRNBoost2Extractor(seed=2).extract(_context(adata))
    pd.testing.assert_frame_equal(first.table, again.table)
    assert not _links(first).equals(_links(other))
    # seed None: the stream a recipe would fill it from, so the run seed matters.
    unset = [GRNBoost2Extractor().extract(_context(adata, seed=s)).metadata["seed"] for s in (0, 0, 1)]
    assert unset[0] == unset[1] != unset[2]


def test_tf_list_restricts_sources_and_is_read_from_files(tmp_path):
    adata, _ = _synthetic(n_cells=200, n_genes=8, n_regulators=3)
    tfs = ["G0", "G1", "G2", "NOT_A_GENE"]
    from_list = GRNBoost2Extractor(tf_list=tfs, seed=0).extract(_context(adata))
    assert set(from_list.table["source"]) <= {"G0", "G1", "G2"}
    assert "G5" in set(from_list.table["target"]) and "G1" in set(from_list.table["target"])
    assert (from_list.table["source"] != from_list.table["target"]).all()
    assert from_list.metadata["tf_listed"] == 4 and from_list.metadata["tf_in_universe"] == 3
    text = tmp_path / "tfs.txt"
    text.write_text("# regulators\nG0\nG1\n\nG2\n")
    csv = tmp_path / "tfs.csv"
    csv.write_text("TF,Sources\nG0,a\nG1,b\nG2,c\n")
    for path in (text, csv):
        from_file = GRNBoost2Extractor(tf_list=str(path), seed=0).extract(_context(adata))
        pd.testing.assert_frame_equal(from_file.table, from_list.table)


def test_bad_tf_list_and_degenerate_data_are_refused():
    adata, _ = _synthetic(n_cells=100, n_genes=8, n_regulators=2)
    with pytest.raises(DataError, match=r"none of the 2 TFs of params.tf_list .*'Sox2'"):
        GRNBoost2Extractor(tf_list=["SOX2", "PAX6"]).extract(_context(adata))
    with pytest.raises(DataError, match="not found"):
        GRNBoost2Extractor(tf_list="/nonexistent/tfs.txt").extract(_context(adata))
    with pytest.raises(DataError, match="layer 'spliced' not found"):
        GENIE3Extractor(layer="spliced").extract(_context(adata))
    constant = adata.copy()
    constant.X = np.ones(constant.shape)
    with pytest.raises(DataError, match="0 of the 8 genes of the universe vary"):
        GRNBoost2Extractor().extract(_context(constant))
    broken = adata.copy()
    broken.X = adata.X.toarray()
    broken.X[3, 2] = np.nan
    with pytest.raises(DataError, match="NaN or infinite"):
        GRNBoost2Extractor().extract(_context(broken))


def test_universe_and_top_k():
    adata, _ = _synthetic(n_cells=200, n_genes=8, n_regulators=3)
    everything = GRNBoost2Extractor(seed=0).extract(_context(adata))
    best = GRNBoost2Extractor(seed=0, top_k=5).extract(_context(adata))
    pd.testing.assert_frame_equal(best.table, everything.table.head(5))
    chosen = ["G0", "G3", "G4", "G7"]
    inside = GRNBoost2Extractor(seed=0, genes=chosen).extract(_context(adata))
    assert inside.genes == chosen
    assert set(inside.table["source"]) | set(inside.table["target"]) <= set(chosen)
    means = np.asarray(adata.X.mean(axis=0)).ravel()
    top = GRNBoost2Extractor(seed=0, n_top_genes=5).extract(_context(adata))
    assert top.genes == list(adata.var_names[np.sort(np.argsort(-means)[:5])])
