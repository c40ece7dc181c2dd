"""csv source: both orientations, counts vs normalised values, metadata; BEELINE and Grubman data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from grnx_core.errors import DataError
from grnx_plugins.data.csv_matrix import CsvMatrix


@pytest.fixture
def tables(tmp_path):
    rng = np.random.default_rng(0)
    counts = pd.DataFrame(
        rng.poisson(3, (5, 7)), index=[f"g{i}" for i in range(5)], columns=[f"c{i}" for i in range(7)]
    )
    genes_x_cells = tmp_path / "expr.csv"
    counts.to_csv(genes_x_cells)
    cells_x_genes = tmp_path / "expr_t.tsv"
    counts.T.to_csv(cells_x_genes, sep="\t")
    return counts, genes_x_cells, cells_x_genes


def test_orientations_agree(tables):
    counts, genes_x_cells, cells_x_genes = tables
    a = CsvMatrix(path=str(genes_x_cells)).load()
    b = CsvMatrix(path=str(cells_x_genes), orientation="cells_x_genes").load()
    assert a.shape == b.shape == (7, 5)
    np.testing.assert_array_equal(a.layers["counts"], counts.T.to_numpy())
    np.testing.assert_array_equal(a.X, b.X)
    assert a.uns["grnx_data"]["values"] == "counts"


def test_normalised_values_and_declared_counts(tmp_path):
    values = pd.DataFrame({"c1": [0.5, 1.2], "c2": [0.0, 2.0]}, index=["g1", "g2"])
    path = tmp_path / "ExpressionData.csv"
    values.to_csv(path)
    adata = CsvMatrix(path=str(path)).load()
    assert "counts" not in adata.layers and adata.uns["grnx_data"]["counts"] == "none"
    with pytest.raises(DataError, match="declared to hold raw counts.*0.5"):
        CsvMatrix(path=str(path), values="counts").load()


def test_text_columns_are_refused(tmp_path):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"gene": ["a", "b"], "c1": [1, 2], "note": ["x", "y"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match="column\\(s\\) note hold text"):
        CsvMatrix(path=str(path)).load()


def test_beeline_gsd(shared_data):
    folder = shared_data / "scrna" / "beeline_gsd_example"
    adata = CsvMatrix(
        path=str(folder / "ex1" / "ExpressionData.csv"), metadata=str(folder / "ex1" / "PseudoTime.csv")
    ).load()
    assert adata.shape == (2000, 19) and "counts" not in adata.layers
    raw = pd.read_csv(folder / "ex1" / "ExpressionData.csv", index_col=0)
    np.testing.assert_allclose(adata.X, raw.T.to_numpy(), rtol=1e-6)
    # Every cell has a pseudotime on at least one of the two simulated trajectories (the file's 1,442 + 558).
    on_trajectories = adata.obs[["PseudoTime1", "PseudoTime2"]].notna().sum(axis=1)
    assert on_trajectories.value_counts().to_dict() == {1: 1442, 2: 558}
    network = pd.read_csv(folder / "GroundTruthNetwork.csv")
    assert set(network["Gene1"]) | set(network["Gene2"]) <= set(adata.var_names)


def test_grubman2019(shared_data):
    folder = shared_data / "scrna" / "grubman2019_ad_entorhinal_small"
    adata = CsvMatrix(
        path=str(folder / "GSE138852_small.csv"),
        metadata=str(folder / "GSE138852_covariates.csv.gz"),
        required_obs=["oupSample.batchCond", "oupSample.cellType"],
    ).load()
    assert adata.shape == (48, 1000)
    assert set(adata.obs["oupSample.batchCond"]) == {"AD", "ct"}
    raw = pd.read_csv(folder / "GSE138852_small.csv", index_col=0)
    np.testing.assert_array_equal(adata.layers["counts"], raw.T.to_numpy())


@pytest.mark.parametrize(
    ("orientation", "text", "where"),
    [
        ("genes_x_cells", ",c1,c2,c1\ng1,1,2,3\ng2,0,1,4\n", "the header line"),
        ("cells_x_genes", ",g1,g2\nc1,1,2\nc2,0,1\nc1,3,4\n", "the first column"),
    ],
)
def test_repeated_cell_names_are_refused(tmp_path, orientation, text, where):
    """pandas renames a repeated header ("c1.1"): the rule must see the names as written."""
    path = tmp_path / "expr.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"cell names repeat.*in {where} \(e.g. 'c1'\)"):
        CsvMatrix(path=str(path), orientation=orientation).load()


def test_obs_columns_from_cell_names(tmp_path):
    """obs_from_names reads the capture group of every cell name; misses and bad patterns are refused."""
    names = ["AAAC_AD1_AD2", "GGTT_AD1_AD2", "CCAA_Ct3_Ct4", "TTGA_Ct3_Ct4"]
    table = pd.DataFrame([[1, 2, 0, 4], [0, 3, 1, 1]], index=["g1", "g2"], columns=names)
    path = tmp_path / "expr.csv"
    table.to_csv(path)
    pattern = r"_((?:AD|Ct)\d+_(?:AD|Ct)\d+)$"
    source = CsvMatrix(path=str(path), obs_from_names={"library": pattern}, required_obs=["library"])
    assert source.obs_columns() == ["library"]
    adata = source.load()
    assert list(adata.obs["library"]) == ["AD1_AD2", "AD1_AD2", "Ct3_Ct4", "Ct3_Ct4"]
    with pytest.raises(DataError, match=r"matches no part of 2 of the 4 cell names \(e.g. 'CCAA_Ct3_Ct4'"):
        CsvMatrix(path=str(path), obs_from_names={"library": r"_(AD\d+_AD\d+)$"}).load()
    metadata = tmp_path / "meta.csv"
    pd.DataFrame({"cell": names, "library": ["x"] * 4}).to_csv(metadata, index=False)
    with pytest.raises(DataError, match=r"obs_from_names would write obs\['library'\], which the data"):
        CsvMatrix(path=str(path), metadata=str(metadata), obs_from_names={"library": pattern}).load()
    with pytest.raises(ValueError, match="has 2 capture groups; it needs exactly one"):
        CsvMatrix.Params(path=str(path), obs_from_names={"library": r"_(AD)(\d+)"})
    with pytest.raises(ValueError, match="is not a regular expression"):
        CsvMatrix.Params(path=str(path), obs_from_names={"library": r"_(AD"})
