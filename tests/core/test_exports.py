"""Interactions exported for BEELINE, AnnData varp and openproblems; `grnx export interactions`."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from grnx_core import DataError, Interactions
from grnx_core.cli import main
from grnx_core.exports import export_interactions, write_beeline, write_openproblems, write_varp


def undirected_signed() -> Interactions:
    # |r| ranks, the sign of r kept apart (an extractor's rank_by: abs)
    table = pd.DataFrame(
        {
            "source": ["A", "B", "A", "C"],
            "target": ["B", "C", "D", "D"],
            "score": [0.9, 0.7, 0.4, 0.1],
            "sign": np.array([1, -1, 1, -1], dtype=np.int8),
        }
    )
    return Interactions(table, directed=False, extractor="pearson", genes=list("ABCDE"))


def directed_list() -> Interactions:
    table = pd.DataFrame({"source": ["A", "B", "C"], "target": ["B", "A", "A"], "score": [3.0, 2.0, 1.0]})
    return Interactions(
        table,
        directed=True,
        extractor="grnboost2",
        genes=list("ABC"),
        metadata={"direction": "regulator -> target"},
    )


def test_beeline_file_holds_an_undirected_pair_both_ways_with_its_signed_weight(tmp_path):
    path = write_beeline(undirected_signed(), tmp_path / "rankedEdges.csv")
    edges = pd.read_csv(path, sep="\t")
    assert list(edges.columns) == ["Gene1", "Gene2", "EdgeWeight"]
    expected = [
        ("A", "B", 0.9),
        ("B", "A", 0.9),
        ("B", "C", -0.7),
        ("C", "B", -0.7),
        ("A", "D", 0.4),
        ("D", "A", 0.4),
        ("C", "D", -0.1),
        ("D", "C", -0.1),
    ]
    assert list(edges.itertuples(index=False, name=None)) == expected
    # BEELINE ranks by |EdgeWeight|: the file's order is that ranking
    assert edges["EdgeWeight"].abs().is_monotonic_decreasing
    assert not any(name.startswith(".") for name in (p.name for p in tmp_path.iterdir()))


def test_beeline_file_of_a_directed_list_keeps_each_orientation_once(tmp_path):
    edges = pd.read_csv(write_beeline(directed_list(), tmp_path / "r.csv"), sep="\t")
    assert list(edges.itertuples(index=False, name=None)) == [
        ("A", "B", 3.0),
        ("B", "A", 2.0),
        ("C", "A", 1.0),
    ]


def test_negative_scores_are_refused_where_tools_rank_by_magnitude(tmp_path):
    table = pd.DataFrame({"source": ["A", "B"], "target": ["B", "C"], "score": [0.5, -0.8]})
    signed_values = Interactions(table, directed=False, extractor="pearson", genes=list("ABC"))
    for write in (
        lambda: write_beeline(signed_values, tmp_path / "r.csv"),
        lambda: write_openproblems(signed_values, tmp_path / "p.h5ad", method_id="m", dataset_id="d"),
    ):
        with pytest.raises(DataError, match=r"1 of the 2 pairs .* negative scores .* rank_by: abs"):
            write()
    assert not list(tmp_path.iterdir())
    empty = Interactions(table.head(0), directed=False, extractor="pearson", genes=list("ABC"))
    with pytest.raises(DataError, match="hold no pairs"):
        write_varp(empty, tmp_path / "v.h5ad")


def test_varp_matrix_is_the_scores_symmetric_when_undirected(tmp_path):
    adata = ad.read_h5ad(write_varp(undirected_signed(), tmp_path / "grn.h5ad"))
    assert list(adata.var_names) == list("ABCDE") and adata.n_obs == 0
    matrix = adata.varp["grnx_pearson"].toarray()
    expected = np.zeros((5, 5))
    for (a, b), score in zip([(0, 1), (1, 2), (0, 3), (2, 3)], [0.9, 0.7, 0.4, 0.1]):
        expected[a, b] = expected[b, a] = score
    np.testing.assert_array_equal(matrix, expected)
    assert adata.uns["grnx"]["direction"] == "undirected" and not adata.uns["grnx"]["directed"]

    directed = ad.read_h5ad(write_varp(directed_list(), tmp_path / "d.h5ad"))
    matrix = directed.varp["grnx_grnboost2"].toarray()
    np.testing.assert_array_equal(matrix, [[0, 3, 0], [2, 0, 0], [1, 0, 0]])
    assert directed.uns["grnx"]["direction"] == "regulator -> target"


def test_openproblems_prediction_reads_back_as_the_task_reads_it(tmp_path):
    path = write_openproblems(
        undirected_signed(), tmp_path / "prediction.h5ad", method_id="grnx_pearson", dataset_id="op"
    )
    adata = ad.read_h5ad(path)
    assert adata.uns["method_id"] == "grnx_pearson" and adata.uns["dataset_id"] == "op"
    prediction = pd.DataFrame(adata.uns["prediction"])
    assert list(prediction.columns) == ["source", "target", "weight"]
    # task_grn_inference src/utils/util.py process_links: pd.to_numeric, then rank by |weight|
    weight = pd.to_numeric(prediction["weight"], errors="coerce")
    assert weight.notna().all()
    assert list(zip(prediction["source"], prediction["target"], weight)) == [
        ("A", "B", 0.9),
        ("B", "A", 0.9),
        ("B", "C", -0.7),
        ("C", "B", -0.7),
        ("A", "D", 0.4),
        ("D", "A", 0.4),
        ("C", "D", -0.1),
        ("D", "C", -0.1),
    ]
    with pytest.raises(DataError, match="non-empty dataset_id"):
        write_openproblems(undirected_signed(), tmp_path / "x.h5ad", method_id="m", dataset_id=" ")


def test_top_k_keeps_the_best_pairs_and_an_existing_file_is_replaced(tmp_path):
    target = tmp_path / "r.csv"
    target.write_text("old\n")
    export_interactions(undirected_signed(), target, "beeline", top_k=2)
    edges = pd.read_csv(target, sep="\t")
    assert edges["Gene1"].tolist() == ["A", "B", "B", "C"]
    with pytest.raises(DataError, match="unknown export format 'csv'"):
        export_interactions(undirected_signed(), target, "csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]


# -- the command, on a tracked run ------------------------------------------------------------------

RECIPE = """
schema_version: 1
name: export_interactions
data: {name: scanpy_builtin, params: {dataset: krumsiek11}}
extractors: [{name: pearson, params: {rank_by: abs}}, {name: spearman, params: {rank_by: abs}}]
tracking: {experiment: export_interactions}
"""


def run_recipe(recipe: Path, capture) -> str:
    assert main(["run", str(recipe), "--no-cache"]) == 0
    match = re.search(r"^run (\S+): FINISHED", capture(), re.MULTILINE)
    assert match is not None
    return match.group(1)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One tracked run of RECIPE (in the session's temporary store), shared by the tests below."""
    import contextlib
    import io

    folder = tmp_path_factory.mktemp("export-run")
    recipe = folder / "recipe.yaml"
    recipe.write_text(textwrap.dedent(RECIPE))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_id = run_recipe(recipe, printed.getvalue)
    return folder, run_id


def test_export_interactions_of_a_run(tracked_run, tmp_path, capsys):
    _, run_id = tracked_run
    out = tmp_path / "rankedEdges.csv"
    code = main(["export", "interactions", run_id, str(out), "--format", "beeline", "--extractor", "pearson"])
    assert code == 0
    assert (
        f"wrote {out} (beeline format): 55 undirected pairs from extractor 'pearson'"
        in capsys.readouterr().out
    )
    edges = pd.read_csv(out, sep="\t")
    assert len(edges) == 110  # 11 genes: 55 pairs, both orientations
    # independent: Pearson of krumsiek11 with numpy
    adata = sc.datasets.krumsiek11()
    genes = list(adata.var_names)
    corr = np.corrcoef(np.asarray(adata.X, dtype=np.float64), rowvar=False)
    expected = [corr[genes.index(a), genes.index(b)] for a, b in zip(edges["Gene1"], edges["Gene2"])]
    np.testing.assert_allclose(edges["EdgeWeight"], expected, atol=1e-9)
    assert edges["EdgeWeight"].abs().is_monotonic_decreasing
    assert set(zip(edges["Gene1"], edges["Gene2"])) == {(a, b) for a in genes for b in genes if a != b}

    varp = tmp_path / "grn.h5ad"
    assert (
        main(["export", "interactions", run_id, str(varp), "--format", "varp", "--extractor", "spearman"])
        == 0
    )
    capsys.readouterr()
    matrix = ad.read_h5ad(varp).varp["grnx_spearman"].toarray()
    np.testing.assert_allclose(matrix, matrix.T)
    assert (matrix > 0).sum() == 110

    prediction = tmp_path / "prediction.h5ad"
    args = ["export", "interactions", run_id, str(prediction), "--format", "openproblems", "--extractor"]
    assert main([*args, "pearson", "--top-k", "10"]) == 0
    capsys.readouterr()
    written = ad.read_h5ad(prediction)
    assert written.uns["method_id"] == "grnx_pearson" and written.uns["dataset_id"] == "export_interactions"
    assert len(pd.DataFrame(written.uns["prediction"])) == 20


def test_export_interactions_errors_say_what_to_do(tracked_run, tmp_path, capsys):
    folder, run_id = tracked_run
    out = tmp_path / "r.csv"
    assert main(["export", "interactions", "0123456789abcdef", str(out), "--format", "beeline"]) == 2
    assert "no run '0123456789abcdef' in the tracking store" in capsys.readouterr().err
    assert main(["export", "interactions", run_id, str(out), "--format", "beeline"]) == 2
    assert "several extractors (pearson, spearman); choose one with --extractor ID" in capsys.readouterr().err
    assert (
        main(["export", "interactions", run_id, str(out), "--format", "beeline", "--extractor", "nid"]) == 2
    )
    assert "no interactions from extractor 'nid'; it has pearson, spearman" in capsys.readouterr().err
    args = ["export", "interactions", run_id, str(out), "--format", "beeline", "--extractor", "pearson"]
    assert main([*args, "--top-k", "0"]) == 2
    assert "--top-k must be at least 1" in capsys.readouterr().err
    out.write_text("keep me\n")
    assert main(args) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_text() == "keep me\n"
    assert main([*args, "--force"]) == 0
    assert out.read_text().startswith("Gene1\tGene2\tEdgeWeight\n")
    with pytest.raises(SystemExit):  # the format is required
        main(["export", "interactions", run_id, str(out)])
    capsys.readouterr()
    # a run without extractors
    bare = folder / "bare.yaml"
    bare.write_text(textwrap.dedent(RECIPE).replace("extractors: [", "#"))
    bare_id = run_recipe(bare, lambda: capsys.readouterr().out)
    assert main(["export", "interactions", bare_id, str(tmp_path / "b.csv"), "--format", "beeline"]) == 2
    assert "logged no interactions: its recipe has no extractors" in capsys.readouterr().err
