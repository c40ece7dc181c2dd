"""scrublet against scanpy's pp.scrublet; per batch; flag or remove; counts untouched; errors."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

from grnx_core.errors import DataError
from grnx_plugins.preprocess.scrublet import Scrublet


def as_array(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def with_doublets(make_adata, dense: bool = False) -> ad.AnnData:
    """400 cells plus 40 artificial doublets (sums of two cells of different clusters)."""
    adata = make_adata(n_cells=400, n_genes=100, dense=dense)
    counts = as_array(adata.X)
    rng = np.random.default_rng(1)
    first = rng.choice(np.flatnonzero(adata.obs["cell_type"] == "astro"), 40, replace=False)
    second = rng.choice(np.flatnonzero(adata.obs["cell_type"] == "neuron"), 40, replace=False)
    obs = adata.obs.iloc[first].set_axis([f"doublet{i}" for i in range(40)])
    doublets = ad.AnnData(X=counts[first] + counts[second], obs=obs, var=adata.var)
    merged = ad.concat([adata, doublets])
    merged.X = merged.X if dense else sp.csr_matrix(merged.X)
    return merged


@pytest.mark.parametrize("dense", [False, True])
def test_matches_scanpy_per_batch(make_adata, dense):
    adata = with_doublets(make_adata, dense)
    # The step hands scanpy CSR counts whatever the input layout (dense and sparse then agree), so
    # the reference is scanpy on the CSR counts.
    expected = adata.copy()
    expected.X = sp.csr_matrix(expected.X)
    sc.pp.scrublet(expected, batch_key="batch", n_prin_comps=10, random_state=0, verbose=False)
    before = as_array(adata.X).copy()
    result = Scrublet(batch_key="batch", n_prin_comps=10)(adata)
    np.testing.assert_allclose(result.obs["doublet_score"], expected.obs["doublet_score"], rtol=1e-6)
    np.testing.assert_array_equal(result.obs["predicted_doublet"], expected.obs["predicted_doublet"])
    np.testing.assert_array_equal(as_array(result.X), before)  # counts untouched
    assert set(result.uns["scrublet"]["batches"]) == {"b1", "b2"}
    # The planted doublets score higher than the real cells (ROC AUC of the score).
    is_doublet = result.obs_names.str.startswith("doublet")
    assert roc_auc_score(is_doublet, result.obs["doublet_score"]) > 0.9


def test_remove_and_figure(make_adata):
    adata = with_doublets(make_adata)
    step = Scrublet(action="remove", batch_key="batch", n_prin_comps=10)
    flagged = Scrublet(batch_key="batch", n_prin_comps=10)(adata.copy())
    result = step(adata)
    assert result.n_obs == adata.n_obs - int(flagged.obs["predicted_doublet"].sum()) > 0
    assert not result.obs["predicted_doublet"].any()
    assert result.uns["scrublet_summary"]["n_removed"] == flagged.obs["predicted_doublet"].sum() > 0
    figure = step.figures(result)["scrublet_umap"]
    assert [ax.get_title() for ax in figure.axes if ax.get_title()] == [
        "batch",
        "doublet_score",
        "predicted_doublet",
    ]


def test_errors(make_adata):
    adata = make_adata(n_cells=60)
    with pytest.raises(DataError, match="batch_key is 'library'.*Available: donor, batch"):
        Scrublet(batch_key="library")(adata)
    normalised = adata.copy()
    sc.pp.log1p(normalised)
    with pytest.raises(DataError, match="needs raw integer counts"):
        Scrublet()(normalised)
    with pytest.raises(DataError, match="too few"):
        Scrublet(batch_key="donor", n_prin_comps=30)(adata)
    with pytest.raises(DataError, match="too few variable genes for n_prin_comps=50"):
        Scrublet(n_prin_comps=50)(make_adata(n_cells=200, n_genes=30))


def test_seed_changes_the_simulated_doublets_and_none_acts_as_zero(make_adata):
    adata = make_adata(n_cells=200, n_genes=100)
    scores = {
        seed: Scrublet(n_prin_comps=10, seed=seed)(adata.copy()).obs["doublet_score"].to_numpy()
        for seed in (0, 1)
    }
    np.testing.assert_array_equal(
        Scrublet(n_prin_comps=10, seed=1)(adata.copy()).obs["doublet_score"], scores[1]
    )
    assert not np.allclose(scores[0], scores[1])
    np.testing.assert_array_equal(Scrublet(n_prin_comps=10)(adata.copy()).obs["doublet_score"], scores[0])


def test_batch_key_left_unset_scores_all_cells_together(make_adata):
    """batch_key defaults to data.batch_key; with neither set, all cells form one library (no error)."""
    result = Scrublet(n_prin_comps=10)(make_adata(n_cells=200, n_genes=100))
    assert "batches" not in result.uns["scrublet"] and result.uns["scrublet_summary"]["n_cells"] == 200
    with pytest.raises(DataError, match=r"Set batch_key \(or data\.batch_key, which it defaults to\)"):
        Scrublet(batch_key="library")(make_adata(n_cells=60))
