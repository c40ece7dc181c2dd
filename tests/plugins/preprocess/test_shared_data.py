"""The preprocessing chain on real data (../shared/data/scrna), checked against scanpy called directly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scanpy as sc

from grnx_plugins.data.csv_matrix import CsvMatrix
from grnx_plugins.data.tenx_mtx import TenxMtx
from grnx_plugins.preprocess.balance import Balance
from grnx_plugins.preprocess.highly_variable_genes import HighlyVariableGenes
from grnx_plugins.preprocess.log1p import Log1p
from grnx_plugins.preprocess.normalize_total import NormalizeTotal
from grnx_plugins.preprocess.pca import Pca
from grnx_plugins.preprocess.qc_filter import QcFilter
from grnx_plugins.preprocess.scale import Scale
from grnx_plugins.preprocess.select_cells import SelectCells
from grnx_plugins.preprocess.split import Split


def test_kang2018_chain_matches_scanpy(shared_data):
    folder = shared_data / "scrna" / "kang2018_pbmc_ifnb"
    adata = TenxMtx(path=str(folder), metadata=str(folder / "cell_metadata.tsv")).load()
    expected = adata.copy()
    sc.pp.filter_cells(expected, min_genes=300)
    sc.pp.filter_genes(expected, min_cells=5)
    sc.pp.normalize_total(expected, target_sum=10_000)
    sc.pp.log1p(expected)
    sc.pp.highly_variable_genes(expected, n_top_genes=1000, subset=True)
    sc.pp.scale(expected, max_value=10)
    sc.pp.pca(expected, n_comps=20, random_state=0)

    steps = [
        QcFilter(min_genes=300, min_cells=5),
        NormalizeTotal(target_sum=10_000),
        Log1p(),
        HighlyVariableGenes(n_top_genes=1000, subset=True),
        Scale(max_value=10),
        Pca(n_comps=20),
    ]
    for step in steps:
        adata = step(adata)
    assert list(adata.obs_names) == list(expected.obs_names) and list(adata.var_names) == list(
        expected.var_names
    )
    np.testing.assert_allclose(adata.obsm["X_pca"], expected.obsm["X_pca"], rtol=1e-3, atol=1e-3)
    # Raw counts of the kept cells and genes are still there, as integers.
    counts = adata.layers["counts"]
    assert counts.shape == adata.shape and np.all(np.mod(counts.data, 1) == 0)
    # IFN-beta response (Kang et al. 2018): the interferon-stimulated gene ISG15 is highly variable and
    # far higher in STIM than in CTRL cells, in the kept raw counts.
    stim = (adata.obs["condition"] == "STIM").to_numpy()
    isg15 = np.asarray(counts[:, adata.var_names.get_loc("ISG15")].todense()).ravel()
    assert isg15[stim].mean() > 10 * isg15[~stim].mean()


def test_grubman2019_donor_split_and_balance(shared_data):
    folder = shared_data / "scrna" / "grubman2019_ad_entorhinal_small"
    adata = CsvMatrix(
        path=str(folder / "GSE138852_small.csv"),
        metadata=str(folder / "GSE138852_covariates.csv.gz"),
        # Nuclei were pooled per pair of donors; the pool is the barcode suffix (e.g. AD3_AD4).
        obs_from_names={"pool": r"_((?:AD|Ct)\d+_(?:AD|Ct)\d+)$"},
    ).load()
    pools = pd.crosstab(adata.obs["pool"], adata.obs["oupSample.batchCond"])
    assert set(pools.index) == {"AD1_AD2", "AD3_AD4", "Ct1_Ct2", "Ct3_Ct4", "Ct5_Ct6"}
    assert ((pools > 0).sum(axis=1) == 1).all(), "a pool holds one diagnosis (AD or control donors)"
    adata = SelectCells(where={"oupSample.batchCond": ["AD", "ct"]})(adata)
    adata = Split(donor_key="pool", label_key="oupSample.batchCond", test_fraction=0.34, seed=0)(adata)
    train = set(adata.obs.loc[adata.obs["split"] == "train", "pool"])
    test = set(adata.obs.loc[adata.obs["split"] == "test", "pool"])
    assert train and test and not train & test
    assert set(adata.obs.loc[adata.obs["split"] == "test", "oupSample.batchCond"]) == {"AD", "ct"}
    balanced = Balance(label_key="oupSample.batchCond", apply_to="train", seed=0)(adata)
    sizes = balanced.obs[balanced.obs["split"] == "train"]["oupSample.batchCond"].value_counts()
    assert sizes["AD"] == sizes["ct"]
