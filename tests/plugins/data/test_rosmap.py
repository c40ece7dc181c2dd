"""rosmap source: cell -> batch -> subject -> diagnosis joins and partial annotation, with clear errors."""

from __future__ import annotations

import gzip

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from grnx_core.errors import DataError
from grnx_plugins.data.rosmap import Rosmap

BARCODES = [f"AAAC{i:02d}-1" for i in range(6)]


def write_library(folder, counts):
    folder.mkdir(parents=True)
    with gzip.open(folder / "matrix.mtx.gz", "wb") as handle:
        scipy.io.mmwrite(handle, sp.coo_matrix(counts.T))
    pd.DataFrame(
        {"id": [f"ENSG{i:011d}" for i in range(4)], "name": list("ABCD"), "type": "Gene Expression"}
    ).to_csv(folder / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(BARCODES).to_csv(folder / "barcodes.tsv.gz", header=False, index=False)


@pytest.fixture
def layout(tmp_path):
    """Two libraries (B1, B2) of 6 cells, their subjects, a clinical table, annotations for 7 cells."""
    rng = np.random.default_rng(0)
    counts = {b: rng.poisson(3, (6, 4)) for b in ("B1", "B2")}
    for batch, matrix in counts.items():
        write_library(tmp_path / "libraries" / batch, matrix)
    pd.DataFrame({"libraryBatch": ["B1", "B2"], "projid": [10, 20]}).to_csv(
        tmp_path / "batches.csv", index=False
    )
    pd.DataFrame({"projid": [10, 20, 30], "cogdx": [4.0, 1.0, 2.0], "msex": [0, 1, 1]}).to_csv(
        tmp_path / "clinical.csv", index=False
    )
    annotated = [f"{b}_B1" for b in BARCODES[:4]] + [f"{b}_B2" for b in BARCODES[3:]]
    pd.DataFrame({"cell": annotated, "cell_type": ["Ast", "Mic", "Ex", "Ex", "In", "Ast", "Oli"]}).to_csv(
        tmp_path / "annotation.tsv", sep="\t", index=False
    )
    return tmp_path, counts


def source(root, **changes):
    params = dict(
        counts=str(root / "libraries"),
        batch_column="libraryBatch",
        batch_table=str(root / "batches.csv"),
        clinical_table=str(root / "clinical.csv"),
        diagnosis_map={"4": "AD", "1": "Not AD"},
        clinical_columns=["msex"],
        annotation_table=str(root / "annotation.tsv"),
    )
    params.update(changes)
    return Rosmap(**params)


def test_joins(layout):
    root, counts = layout
    adata = source(root).load()
    assert adata.n_obs == 12 and list(adata.obs_names[:2]) == ["AAAC00-1_B1", "AAAC01-1_B1"]
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), np.vstack([counts["B1"], counts["B2"]]))
    b1 = adata.obs["batch"] == "B1"
    assert (adata.obs.loc[b1, "subject"] == "10").all() and (adata.obs.loc[~b1, "subject"] == "20").all()
    assert (adata.obs.loc[b1, "diagnosis"] == "AD").all() and (
        adata.obs.loc[~b1, "diagnosis"] == "Not AD"
    ).all()
    assert list(adata.obs["msex"]) == [0] * 6 + [1] * 6
    assert adata.obs["cell_type"].notna().sum() == 7
    assert adata.obs.loc["AAAC03-1_B2", "cell_type"] == "In"
    assert adata.uns["rosmap"]["n_cells_annotated"] == 7


def test_unmatched_batch_and_subject(layout):
    root, _ = layout
    pd.DataFrame({"libraryBatch": ["B1"], "projid": [10]}).to_csv(root / "one_batch.csv", index=False)
    with pytest.raises(
        DataError, match=r"6 of 12 cells have a batch \(libraryBatch\).*e.g. B2.*unmatched: drop"
    ):
        source(root, batch_table=str(root / "one_batch.csv")).load()
    dropped = source(root, batch_table=str(root / "one_batch.csv"), unmatched="drop").load()
    assert dropped.n_obs == 6 and set(dropped.obs["batch"]) == {"B1"}
    assert dropped.uns["rosmap"]["n_cells_unknown_batch"] == 6
    pd.DataFrame({"projid": [10], "cogdx": [4]}).to_csv(root / "one_subject.csv", index=False)
    with pytest.raises(DataError, match=r"6 of 12 cells have a subject \(projid\).*e.g. 20"):
        source(root, clinical_table=str(root / "one_subject.csv"), clinical_columns=[]).load()


def test_ambiguous_tables(layout):
    root, _ = layout
    pd.DataFrame({"libraryBatch": ["B1", "B1", "B2"], "projid": [10, 11, 20]}).to_csv(
        root / "twice.csv", index=False
    )
    with pytest.raises(DataError, match="maps 'libraryBatch' 'B1' to several 'projid' values"):
        source(root, batch_table=str(root / "twice.csv")).load()
    pd.DataFrame({"projid": [10, 10, 20], "cogdx": [4, 1, 1]}).to_csv(root / "dup.csv", index=False)
    with pytest.raises(DataError, match="several rows for subject"):
        source(root, clinical_table=str(root / "dup.csv"), clinical_columns=[]).load()
    with pytest.raises(DataError, match="has no column 'braaksc'"):
        source(root, clinical_columns=["braaksc"]).load()


def test_single_file_with_batch_in_the_barcode(layout):
    root, counts = layout
    merged = ad.AnnData(
        X=sp.csr_matrix(np.vstack([counts["B1"], counts["B2"]]).astype(np.float32)),
        obs=pd.DataFrame(index=[f"{b}_{batch}" for batch in ("B1", "B2") for b in BARCODES]),
        var=pd.DataFrame(index=list("ABCD")),
    )
    merged.write_h5ad(root / "all.h5ad")
    adata = source(root, counts=str(root / "all.h5ad"), batch_from_barcode=r"_(B\d)$").load()
    assert list(adata.obs["diagnosis"].value_counts().sort_index()) == [6, 6]
    with pytest.raises(DataError, match="does not match 12 cell ids"):
        source(root, counts=str(root / "all.h5ad"), batch_from_barcode=r"-(X\d)$").load()
    with pytest.raises(DataError, match="cells have no batch"):
        source(root, counts=str(root / "all.h5ad")).load()


@pytest.mark.slow
def test_thesis_recipe_on_a_rosmap_like_layout(shared_data, tmp_path):
    """recipes/thesis/preprocess_rosmap.yaml end to end on Kang 2018 cells laid out like ROSMAP.

    Four libraries of 500 cells (two CTRL -> "Not AD" subjects, two STIM -> "AD" subjects), a clinical
    table with cogdx codes, and a cell-type annotation for 80% of the cells.
    """
    from pathlib import Path

    import yaml

    from grnx_core.components import Kind
    from grnx_core.registry import default_registry
    from grnx_plugins.data.tenx_mtx import TenxMtx

    kang = shared_data / "scrna" / "kang2018_pbmc_ifnb"
    cells = TenxMtx(path=str(kang), metadata=str(kang / "cell_metadata.tsv")).load()
    rng = np.random.default_rng(0)
    # The shared Kang subset has no mitochondrial genes; add three so the recipe's mito filter has work.
    mito = ad.AnnData(
        X=sp.csr_matrix(rng.poisson(0.5, (cells.n_obs, 3)).astype(np.float32)),
        obs=cells.obs,
        var=pd.DataFrame(index=["MT-CO1", "MT-ND1", "MT-CYB"]),
    )
    mito.layers["counts"] = mito.X.copy()
    cells = ad.concat([cells, mito], axis=1, merge="first")
    root = tmp_path / "rosmap"
    annotation = []
    for index, condition in enumerate(["CTRL", "CTRL", "STIM", "STIM"]):
        rows = np.flatnonzero(cells.obs["condition"] == condition)[(index % 2) * 500 : (index % 2 + 1) * 500]
        folder = root / "libraries" / f"L{index}"
        folder.mkdir(parents=True)
        with gzip.open(folder / "matrix.mtx.gz", "wb") as handle:
            scipy.io.mmwrite(handle, sp.coo_matrix(cells.layers["counts"][rows].T.astype(np.int64)))
        pd.Series(cells.var_names).to_csv(folder / "genes.tsv.gz", header=False, index=False)
        pd.Series(cells.obs_names[rows]).to_csv(folder / "barcodes.tsv.gz", header=False, index=False)
        annotated = rows[rng.random(len(rows)) < 0.8]
        annotation += [
            (f"{b}_L{index}", t, "s1")
            for b, t in zip(cells.obs_names[annotated], rng.choice(["T", "Mono"], len(annotated)))
        ]
    pd.DataFrame({"libraryBatch": [f"L{i}" for i in range(4)], "projid": [1, 2, 3, 4]}).to_csv(
        root / "batch_to_subject.csv", index=False
    )
    pd.DataFrame(
        {
            "projid": [1, 2, 3, 4],
            "cogdx": [1, 1, 4, 4],
            "braaksc": [1, 2, 5, 6],
            "ceradsc": [4, 4, 1, 2],
            "msex": [0, 1, 0, 1],
            "age_death": [85.0, 90.1, 88.2, 91.3],
        }
    ).to_csv(root / "ROSMAP_clinical.csv", index=False)
    pd.DataFrame(annotation, columns=["cell", "cell_type", "state"]).to_csv(
        root / "cell_annotation.csv", index=False
    )

    recipe = yaml.safe_load(
        (Path(__file__).parents[3] / "recipes" / "thesis" / "preprocess_rosmap.yaml").read_text()
    )
    params = recipe["data"]["params"]
    for key, name in [
        ("counts", "libraries"),
        ("batch_table", "batch_to_subject.csv"),
        ("clinical_table", "ROSMAP_clinical.csv"),
        ("annotation_table", "cell_annotation.csv"),
    ]:
        params[key] = str(root / name)
    registry = default_registry()
    adata = registry.get(Kind.DATA, recipe["data"]["name"])(**params).load()
    assert adata.n_obs == 2000 and set(adata.obs["diagnosis"]) == {"AD", "Not AD"}
    for step in recipe["preprocess"]:
        step_params = dict(step["params"])
        if step["name"] == "map_gene_ids":
            step_params["table"] = str(shared_data / "geneformer" / "v1" / "gene_name_id_dict.tsv")
        component = registry.get(Kind.PREPROCESSOR, step["name"])(**step_params)
        adata = component(adata)
        component.figures(adata)
    assert adata.var_names.str.startswith("ENSG").all() and adata.raw.n_vars > adata.n_vars
    assert adata.uns["qc_filter"]["n_cells_out"] < adata.uns["qc_filter"]["n_cells_in"]
    train = adata.obs[adata.obs["split"] == "train"]
    test = adata.obs[adata.obs["split"] == "test"]
    assert not set(train["subject"]) & set(test["subject"]) and len(test) > 0
    counts = train.groupby(["cell_type", "diagnosis"], observed=True).size().unstack()
    assert (counts["AD"] == counts["Not AD"]).all()
