"""map_gene_ids: symbol <-> Ensembl with a table, duplicates summed, coverage reported; Geneformer dicts."""

from __future__ import annotations

import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from grnx_core.errors import DataError
from grnx_plugins.preprocess.map_gene_ids import MapGeneIds


@pytest.fixture
def small(tmp_path):
    counts = np.arange(1, 21, dtype=np.float32).reshape(4, 5)
    adata = ad.AnnData(
        X=sp.csr_matrix(counts), var=pd.DataFrame(index=["TP53", "tp53b", "APOE", "NOPE", "APOE-AS"])
    )
    adata.layers["counts"] = adata.X.copy()
    table = pd.DataFrame(
        {
            "gene_symbol": ["TP53", "TP53B", "APOE", "APOE-AS", "OTHER"],
            "ensembl_id": [
                "ENSG00000141510",
                "ENSG00000141510.3",
                "ENSG00000130203",
                "ENSG00000130203",
                "ENSG1",
            ],
        }
    )
    path = tmp_path / "ids.tsv"
    table.to_csv(path, sep="\t", index=False)
    return adata, counts, path


def test_symbols_to_ensembl_with_sums_and_report(small):
    adata, counts, path = small
    result = MapGeneIds(table=str(path))(adata)
    assert list(result.var_names) == ["ENSG00000141510", "ENSG00000130203"]
    # TP53 + tp53b (case-insensitive match, version suffix ignored) and APOE + APOE-AS are summed.
    expected = np.stack([counts[:, 0] + counts[:, 1], counts[:, 2] + counts[:, 4]], axis=1)
    np.testing.assert_array_equal(result.X.toarray(), expected)
    np.testing.assert_array_equal(result.layers["counts"].toarray(), expected)
    assert list(result.var["original_id"]) == ["TP53|tp53b", "APOE|APOE-AS"]
    report = result.uns["map_gene_ids"]
    assert (report["n_genes_in"], report["n_mapped"], report["n_dropped"], report["n_merged"]) == (5, 4, 1, 2)
    assert report["coverage"] == pytest.approx(0.8)
    assert report["fraction_of_counts_kept"] == pytest.approx(1 - counts[:, 3].sum() / counts.sum())


def test_first_duplicate_keep_unmapped_and_back_to_symbols(small):
    adata, counts, path = small
    kept = MapGeneIds(table=str(path), duplicates="first", unmapped="keep")(adata.copy())
    assert list(kept.var_names) == ["ENSG00000141510", "ENSG00000130203", "NOPE"]
    np.testing.assert_array_equal(kept.X.toarray(), counts[:, [0, 2, 3]])
    back = MapGeneIds(table=str(path), to="symbol", unmapped="keep")(kept)
    assert list(back.var_names) == ["TP53", "APOE", "NOPE"]


def test_dense_input_gives_the_same_sums(small):
    adata, counts, path = small
    dense = ad.AnnData(X=counts.copy(), var=adata.var.copy())
    result = MapGeneIds(table=str(path))(dense)
    np.testing.assert_array_equal(result.X, MapGeneIds(table=str(path))(adata).X.toarray())


def test_no_match_and_coverage_errors(small):
    adata, _, path = small
    with pytest.raises(DataError, match=r"0 of 5 genes \(0.0%\) map to symbol"):
        MapGeneIds(table=str(path), to="symbol")(adata.copy())
    with pytest.raises(DataError, match="min_coverage 90%"):
        MapGeneIds(table=str(path), min_coverage=0.9)(adata.copy())
    with pytest.raises(DataError, match="no column 'symbol'"):
        MapGeneIds(table=str(path), symbol_column="symbol")(adata.copy())


def test_pickles_load_only_plain_dictionaries(tmp_path, small):
    adata, _, _ = small
    good = tmp_path / "names.pkl"
    good.write_bytes(pickle.dumps({"TP53": np.str_("ENSG00000141510"), "APOE": "ENSG00000130203"}))
    assert MapGeneIds(table=str(good))(adata.copy()).n_vars == 2
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"TP53": pd.Timestamp(0)}))
    with pytest.raises(DataError, match="Refusing to load .*pandas"):
        MapGeneIds(table=str(evil))(adata.copy())


def test_geneformer_dictionary_on_kang(shared_data):
    from grnx_plugins.data.tenx_mtx import TenxMtx

    adata = TenxMtx(path=str(shared_data / "scrna" / "kang2018_pbmc_ifnb")).load()
    tsv = shared_data / "geneformer" / "v1" / "gene_name_id_dict.tsv"
    result = MapGeneIds(table=str(tsv))(adata.copy())
    table = pd.read_csv(tsv, sep="\t")
    known = set(table["gene_symbol"])
    # Reference: exact symbol matches counted directly from the dictionary.
    exact = sum(g in known for g in adata.var_names)
    report = result.uns["map_gene_ids"]
    assert report["n_mapped"] >= exact and report["n_mapped"] + report["n_dropped"] == adata.n_vars
    assert 0.85 < report["coverage"] < 1.0
    assert result.var_names.str.startswith("ENSG").all()
    from_pickle = MapGeneIds(table=str(tsv.with_suffix(".pkl")))(adata.copy())
    assert list(from_pickle.var_names) == list(result.var_names)
