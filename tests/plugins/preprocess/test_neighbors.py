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
