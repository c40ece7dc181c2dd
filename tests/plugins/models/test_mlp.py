"""MLP (NID's model): learns a planted rule, exposes its weights, round-trips."""

from __future__ import annotations

from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from grnx_core import CellSample, DataError, DataRoles, RunContext
from grnx_core.errors import GrnxError
from grnx_plugins.models.mlp import MLP


def _adata(n_cells=60, n_genes=12, seed=0, sparse=True):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(1.0, size=(n_cells, n_genes)).astype(np.float32)
    case = np.arange(n_cells) % 2 == 0
    counts[case, 3] += 6  # gene G3 marks case cells
    obs = pd.DataFrame({"label": np.where(case, "AD", "ctrl")}, index=[f"c{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"G{i}" for i in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(counts) if sparse else counts, obs=obs, var=var)


def _context(adata, sample=None, **train):
    settings = {
        "epochs": 60,
        "batch_size": 16,
        "learning_rate": 0.01,
        "validation_fraction": 0.0,
        "device": "cpu",
        **train,
    }
    return RunContext(
        seed=0,
        roles=DataRoles(label_key="label"),
        adata=adata,
        sample=sample,
        train_settings=SimpleNamespace(**settings),
    )


def test_overfits_and_round_trips(tmp_path):
    adata = _adata()
    model = MLP(hidden_sizes=[16, 8], dropout=0.0, standardize=True).fit(_context(adata))
    assert np.mean(model.predict(adata) == adata.obs["label"].to_numpy()) == 1.0
    model.save(tmp_path / "mlp")
    loaded = MLP.load(tmp_path / "mlp")
    np.testing.assert_array_equal(loaded.predict_proba(adata), model.predict_proba(adata))
    np.testing.assert_array_equal(loaded.embed(adata), model.embed(adata))
    # a loaded model is placed on train.device; asking for a GPU that is not there is an error
    loaded.use_device("auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(loaded.network_.parameters()).device.type == expected
    if not torch.cuda.is_available():
        with pytest.raises(GrnxError, match="train.device is 'cuda' but torch sees no CUDA device"):
            loaded.use_device("cuda")


def test_weight_matrices_are_the_network_nid_reads():
    adata = _adata(sparse=False)
    model = MLP(hidden_sizes=[8], dropout=0.0, genes=["G3", "G0", "G5"]).fit(_context(adata, epochs=5))
    w1, w_out = model.weight_matrices()
    assert w1.shape == (8, 3) and w_out.shape == (2, 8)
    assert model.network_.hidden[0].bias is None  # NID: the first layer has no bias
    assert model.genes_ == ["G3", "G0", "G5"]
    # logits recomputed by hand from the exposed weights: softplus(W1 x) -> W_out h + b
    x = torch.tensor(adata[:, ["G3", "G0", "G5"]].X, dtype=torch.float32)
    hidden = F.softplus(x @ torch.from_numpy(w1).T)
    logits = hidden @ torch.from_numpy(w_out).T + model.network_.output.bias.detach()
    np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), model.predict_proba(adata), atol=1e-5)
    np.testing.assert_allclose(model.embed(adata), hidden.numpy(), atol=1e-5)


def test_uses_sampled_train_cells_only():
    adata = _adata(n_cells=80)
    adata.obs["split"] = np.where(np.arange(80) < 60, "train", "test")
    flipped = adata.obs["label"].to_numpy().copy()
    flipped[60:] = np.where(flipped[60:] == "AD", "ctrl", "AD")
    adata.obs["label"] = flipped
    sample = CellSample(indices=np.arange(80), weights=np.ones(80), n_cells_total=80)
    model = MLP(hidden_sizes=[16], dropout=0.0).fit(_context(adata, sample=sample))
    predicted = model.predict(adata)
    assert np.mean(predicted[:60] == flipped[:60]) == 1.0
    assert np.mean(predicted[60:] == flipped[60:]) == 0.0


def test_l1_penalty_shrinks_weights_and_missing_genes_are_reported():
    adata = _adata()
    plain = MLP(hidden_sizes=[8], dropout=0.0).fit(_context(adata, epochs=20))
    sparse = MLP(hidden_sizes=[8], dropout=0.0, l1=0.01).fit(_context(adata, epochs=20))
    assert np.abs(sparse.weight_matrices()[0]).sum() < 0.5 * np.abs(plain.weight_matrices()[0]).sum()
    with pytest.raises(DataError, match="not in var_names"):
        plain.predict(adata[:, :5])
