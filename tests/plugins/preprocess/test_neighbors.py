"""neighbors against scanpy called directly."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc

from grnx_core.errors import DataError
from grnx_plugins.preprocess.neighbors import Neighbors


def test_matches_scanpy(counts_adata):
    sc.pp.log1p(counts_adata)
    sc.pp.pca(counts_adata, n_comps=10)
    expected = counts_adata.copy()
    sc.pp.neighbors(expected, n_neighbors=10, random_state=0)
    result = Neighbors(n_neighbors=10)(counts_adata)
    assert (result.obsp["distances"] != expected.obsp["distances"]).nnz == 0
    np.testing.assert_allclose(
        result.obsp["connectivities"].toarray(), expected.obsp["connectivities"].toarray()
    )
    # k - 1 stored neighbours per cell (scanpy counts the cell itself).
    assert set(np.diff(result.obsp["distances"].indptr)) == {9}


def test_errors(make_adata):
    adata = make_adata(n_cells=20)
    with pytest.raises(DataError, match="use_rep 'X_scvi'"):
        Neighbors(use_rep="X_scvi")(adata)
    with pytest.raises(DataError, match="n_neighbors=30"):
        Neighbors(n_neighbors=30)(adata)


class _ExactIndex:
    """Stands in for pynndescent's ``NNDescent`` index: the exact neighbour graph by brute force.

    The approximate search is numba code whose compilation takes minutes on a busy machine; the
    rest of the path (pynndescent's transformer building its sparse output, grnx's conversion,
    scanpy's graph) runs for real. The real search is covered by the slow tests below.
    """

    built: list[dict] = []

    def __init__(self, data, *, metric, n_neighbors, **settings):
        from sklearn.neighbors import NearestNeighbors

        self.built.append({"metric": metric, "n_neighbors": n_neighbors, **settings})
        search = NearestNeighbors(n_neighbors=n_neighbors, metric=metric, algorithm="brute").fit(data)
        distances, indices = search.kneighbors(data)  # each point first, as NNDescent gives it
        self.neighbor_graph = (indices, distances.astype(np.float32))

    def compress_index(self):
        pass


def test_approximate_neighbour_path_works_on_this_scipy(monkeypatch):
    """From 4,096 cells with a non-euclidean metric scanpy takes the pynndescent path, which fails
    inside scanpy 1.11 on scipy >= 1.14 (``csr_array`` has no ``getnnz``); the step must work there."""
    import anndata as ad
    import pynndescent.pynndescent_
    from sklearn.neighbors import NearestNeighbors

    from grnx_plugins.preprocess._common import scanpy_knn_is_broken

    monkeypatch.setattr(pynndescent.pynndescent_, "NNDescent", _ExactIndex)
    monkeypatch.setattr(_ExactIndex, "built", [])
    points = np.random.default_rng(0).normal(size=(4096, 8)).astype(np.float32)
    if scanpy_knn_is_broken():  # the failure the step works around, from scanpy alone
        with pytest.raises(AttributeError, match="getnnz"):
            sc.pp.neighbors(ad.AnnData(points, obsm={"X_pca": points}), n_neighbors=10, metric="cosine")
        _ExactIndex.built.clear()
    result = Neighbors(n_neighbors=10, metric="cosine", seed=3)(ad.AnnData(points, obsm={"X_pca": points}))
    # one index, built with scanpy's own settings for this size (UMAP's defaults, from
    # scanpy/neighbors/__init__.py: n_trees = min(64, 5 + round(sqrt(n) / 20)), n_iters =
    # max(5, round(log2 n))) and the step's seed; sklearn's convention of k + 1 with the cell itself
    (settings,) = _ExactIndex.built
    assert settings["metric"] == "cosine" and settings["n_neighbors"] == 11
    assert (settings["n_trees"], settings["n_iters"], settings["random_state"]) == (8, 12, 3)
    # on this path scanpy keeps the search's graph as it is: the cell itself and its 10 neighbours
    distances = result.obsp["distances"]
    exact = NearestNeighbors(n_neighbors=11, metric="cosine").fit(points)
    expected = exact.kneighbors(points, return_distance=False)[:, 1:]
    for cell in range(len(points)):
        found = distances.indices[distances.indptr[cell] : distances.indptr[cell + 1]]
        assert set(found) - {cell} == set(expected[cell]), cell
    connectivities = result.obsp["connectivities"]
    assert connectivities.nnz > 0 and abs(connectivities - connectivities.T).max() < 1e-6


@pytest.mark.slow
def test_approximate_neighbours_for_many_cells():
    """From 8,192 cells scanpy switches to pynndescent; the step must work there and find true neighbours."""
    import anndata as ad
    from sklearn.neighbors import NearestNeighbors

    points = np.random.default_rng(0).normal(size=(9000, 8)).astype(np.float32)
    adata = ad.AnnData(points, obsm={"X_pca": points})
    result = Neighbors(n_neighbors=10)(adata)
    distances = result.obsp["distances"]
    exact = NearestNeighbors(n_neighbors=10).fit(points).kneighbors(points, return_distance=False)[:, 1:]
    found = [
        set(distances.indices[distances.indptr[i] : distances.indptr[i + 1]]) for i in range(len(points))
    ]
    recall = np.mean([len(found[i] & set(exact[i])) / 9 for i in range(len(points))])
    assert recall > 0.95


def test_exact_neighbours_do_not_depend_on_the_seed(make_adata):
    adata = make_adata(n_cells=150)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=10)
    graphs = [
        Neighbors(n_neighbors=10, seed=seed)(adata.copy()).obsp["connectivities"] for seed in (None, 0, 1)
    ]
    assert (graphs[0] != graphs[1]).nnz == 0 and (graphs[0] != graphs[2]).nnz == 0


@pytest.mark.slow
def test_approximate_neighbours_follow_the_seed():
    """From 4,096 cells with a non-euclidean metric the search is approximate (pynndescent), hence seeded."""
    import anndata as ad

    points = np.random.default_rng(0).normal(size=(4096, 8)).astype(np.float32)

    def graph(seed):
        adata = ad.AnnData(points, obsm={"X_pca": points})
        return Neighbors(n_neighbors=10, metric="cosine", seed=seed)(adata).obsp["distances"]

    first, again, unset, other = graph(3), graph(3), graph(None), graph(4)
    assert (first != again).nnz == 0 and (unset != graph(0)).nnz == 0
    assert (first != other).nnz > 0
