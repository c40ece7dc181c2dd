"""h5ad source: counts from X, raw or a layer; backed mode; metadata join; clear errors."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from grnx_core.errors import DataError
from grnx_plugins.data.h5ad import H5ad


@pytest.fixture
def h5ad_file(tmp_path):
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, (30, 12)).astype(np.float32)
    normalised = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    adata = ad.AnnData(
        X=sp.csr_matrix(normalised),
        obs=pd.DataFrame(
            {"ADNC": ["High"] * 15 + ["Not AD"] * 15, "donor_id": [f"d{i % 5}" for i in range(30)]},
            index=[f"c{i}" for i in range(30)],
        ),
        var=pd.DataFrame(index=[f"g{i}" for i in range(12)]),
        layers={"UMIs": sp.csr_matrix(counts)},
    )
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    return path, counts


def test_counts_from_a_layer(h5ad_file):
    path, counts = h5ad_file
    adata = H5ad(
        path=str(path), counts="UMIs", required_obs=["label", "donor_id"], rename_obs={"ADNC": "label"}
    ).load()
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), counts)
    np.testing.assert_array_equal(adata.X.toarray(), counts)
    assert not np.shares_memory(adata.X.data, adata.layers["counts"].data)
    assert list(adata.layers) == ["counts"] and "label" in adata.obs
    assert adata.uns["grnx_data"]["counts"] == "layers/counts"


def test_non_integer_counts_are_refused(h5ad_file):
    path, _ = h5ad_file
    with pytest.raises(DataError, match=r"'X' should hold raw integer counts.*layers: UMIs"):
        H5ad(path=str(path)).load()
    with pytest.raises(DataError, match="neither 'X', 'raw' nor a layer"):
        H5ad(path=str(path), counts="spliced").load()


def test_missing_obs_column_and_file(h5ad_file, tmp_path):
    path, _ = h5ad_file
    with pytest.raises(DataError, match=r"obs column 'cell_type' is required.*ADNC, donor_id"):
        H5ad(path=str(path), counts="UMIs", required_obs=["cell_type"]).load()
    with pytest.raises(DataError, match="does not exist"):
        H5ad(path=str(tmp_path / "missing.h5ad")).load()


def test_backed_mode_streams_x(tmp_path, h5ad_file):
    _, counts = h5ad_file
    path = tmp_path / "counts_in_x.h5ad"
    ad.AnnData(X=sp.csr_matrix(counts), obs=pd.DataFrame(index=[f"c{i}" for i in range(30)])).write_h5ad(path)
    adata = H5ad(path=str(path), backed=True).load()
    assert adata.isbacked and adata.uns["grnx_data"]["counts"] == "X"
    np.testing.assert_array_equal(adata.X[5:9].toarray(), counts[5:9])
    with pytest.raises(DataError, match="backed mode streams X"):
        H5ad(path=str(path), backed=True, counts="UMIs").load()


def test_metadata_join(h5ad_file, tmp_path):
    path, _ = h5ad_file
    table = tmp_path / "meta.csv"
    pd.DataFrame({"cell": [f"c{i}" for i in range(25)], "batch": ["b1"] * 25}).to_csv(table, index=False)
    with pytest.raises(DataError, match=r"5 of 30 cells have no row in metadata.*unmatched: drop"):
        H5ad(path=str(path), counts="UMIs", metadata=str(table)).load()
    adata = H5ad(path=str(path), counts="UMIs", metadata=str(table), unmatched="drop").load()
    assert adata.n_obs == 25 and (adata.obs["batch"] == "b1").all()
    kept = H5ad(path=str(path), counts="UMIs", metadata=str(table), unmatched="keep").load()
    assert kept.n_obs == 30 and kept.obs["batch"].isna().sum() == 5


@pytest.mark.parametrize("backed", [False, True])
def test_repeated_cell_names_are_refused(tmp_path, backed):
    import warnings

    with warnings.catch_warnings():  # anndata warns about the names this test means to repeat
        warnings.simplefilter("ignore")
        adata = ad.AnnData(
            X=sp.csr_matrix(np.ones((3, 2), dtype=np.float32)),
            obs=pd.DataFrame(index=["AAAC-1", "AAAG-1", "AAAC-1"]),
            var=pd.DataFrame(index=["g0", "g1"]),
        )
        adata.write_h5ad(tmp_path / "merged.h5ad")
    with pytest.raises(
        DataError, match=r"cell names repeat.*obs_names \(e.g. 'AAAC-1'\).*obs_names_make_unique"
    ):
        H5ad(path=str(tmp_path / "merged.h5ad"), backed=backed).load()
