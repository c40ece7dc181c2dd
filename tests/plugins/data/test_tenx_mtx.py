"""10x_mtx source against scanpy's reader; metadata join on barcode; shared Kang and PBMC3k data."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.io
import scipy.sparse as sp

from grnx_core.errors import DataError
from grnx_plugins.data.tenx_mtx import TenxMtx


def write_v3(folder, counts, genes, barcodes):
    """A Cell Ranger v3 folder: gzipped matrix (genes x cells), features with 3 columns, barcodes."""
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as handle:
        scipy.io.mmwrite(handle, sp.coo_matrix(counts.T.astype(np.int64)))
    features = pd.DataFrame(
        {"id": [f"ENSG{i:011d}" for i in range(len(genes))], "name": genes, "type": "Gene Expression"}
    )
    features.to_csv(folder / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(barcodes).to_csv(folder / "barcodes.tsv.gz", header=False, index=False)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.5, (20, 8))
    genes = ["A", "B", "C", "C", "D", "E", "F", "G"]  # one duplicated symbol
    barcodes = [f"AAAC{i:04d}-1" for i in range(20)]
    write_v3(tmp_path / "sample", counts, genes, barcodes)
    return tmp_path / "sample", counts, barcodes


def test_matches_scanpy_reader(folder):
    path, counts, _ = folder
    adata = TenxMtx(path=str(path)).load()
    expected = sc.read_10x_mtx(path)
    assert list(adata.var_names) == list(expected.var_names)  # C, C-1 made unique as scanpy does
    assert list(adata.obs_names) == list(expected.obs_names)
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), expected.X.toarray())
    np.testing.assert_array_equal(adata.X.toarray(), counts)
    ids = TenxMtx(path=str(path), var_names="gene_ids").load()
    assert ids.var_names[0] == "ENSG00000000000" and ids.var["gene_symbols"].iloc[0] == "A"


def test_metadata_joined_on_barcode(folder, tmp_path):
    path, _, barcodes = folder
    table = tmp_path / "meta.tsv"
    pd.DataFrame({"barcode": barcodes[::-1][:18], "condition": ["CTRL", "STIM"] * 9}).to_csv(
        table, sep="\t", index=False
    )
    with pytest.raises(DataError, match=r"2 of 20 cells have no row.*AAAC0000-1"):
        TenxMtx(path=str(path), metadata=str(table)).load()
    adata = TenxMtx(path=str(path), metadata=str(table), unmatched="drop", required_obs=["condition"]).load()
    assert adata.n_obs == 18
    assert adata.obs.loc[barcodes[19], "condition"] == "CTRL"


def test_bad_inputs(tmp_path, folder):
    path, _, _ = folder
    with pytest.raises(DataError, match=r"no row in metadata|column 'cell'"):
        bad = tmp_path / "bad.csv"
        pd.DataFrame({"x": [1]}).to_csv(bad, index=False)
        TenxMtx(path=str(path), metadata=str(bad), metadata_cell_column="cell").load()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no matrix file"):
        TenxMtx(path=str(empty)).load()
    fractional = tmp_path / "fractional"
    write_v3(fractional, np.zeros((3, 2)), ["A", "B"], ["x", "y", "z"])
    with gzip.open(fractional / "matrix.mtx.gz", "wb") as handle:
        scipy.io.mmwrite(handle, sp.coo_matrix(np.array([[0.5, 1.0, 2.0], [1.0, 0.0, 0.0]])))
    with pytest.raises(DataError, match="raw counts.*0.5"):
        TenxMtx(path=str(fractional)).load()


def test_kang2018(shared_data):
    folder = shared_data / "scrna" / "kang2018_pbmc_ifnb"
    adata = TenxMtx(
        path=str(folder), metadata=str(folder / "cell_metadata.tsv"), required_obs=["condition"]
    ).load()
    assert adata.shape == (2000, 9015)
    assert adata.obs["condition"].value_counts().to_dict() == {"CTRL": 1000, "STIM": 1000}
    reference = scipy.io.mmread(str(folder / "matrix.mtx.gz"))
    assert adata.layers["counts"].sum() == reference.sum() and adata.layers["counts"].nnz == reference.nnz


def test_pbmc3k_ensembl_ids(shared_data):
    adata = TenxMtx(path=str(shared_data / "scrna" / "pbmc3k_small")).load()
    assert adata.shape == (200, 1000) and adata.var_names.str.startswith("ENSG").all()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "features.tsv.gz",
            r"genes/features file features.tsv.gz is empty; expected one line per gene.*params.features",
        ),
        (
            "barcodes.tsv.gz",
            r"barcodes file barcodes.tsv.gz is empty; expected one line per cell.*params.barcodes",
        ),
    ],
)
def test_empty_features_or_barcodes_are_clear_errors(folder, name, message):
    path, _, _ = folder
    with gzip.open(path / name, "wb"):
        pass  # a valid gzip stream holding nothing, as an interrupted copy leaves
    with pytest.raises(DataError, match=message):
        TenxMtx(path=str(path)).load()


def test_repeated_barcodes_are_refused(tmp_path):
    barcodes = ["AAAC-1", "AAAG-1", "AAAC-1"]
    write_v3(tmp_path / "merged", np.ones((3, 2), dtype=int), ["A", "B"], barcodes)
    with pytest.raises(
        DataError, match=r"cell names repeat.*barcodes.tsv.gz \(e.g. 'AAAC-1'\).*prefix each barcode"
    ):
        TenxMtx(path=str(tmp_path / "merged")).load()


def test_files_are_read_by_their_content_not_their_name(folder):
    """A gzipped features file named .tsv (a download that kept the compression) is read as gzip."""
    path, counts, _ = folder
    (path / "features.tsv.gz").rename(path / "features.tsv")
    adata = TenxMtx(path=str(path)).load()
    assert list(adata.var_names[:3]) == ["A", "B", "C"]
    np.testing.assert_array_equal(adata.X.toarray(), counts)
