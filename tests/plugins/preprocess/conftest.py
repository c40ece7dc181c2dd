"""Small count matrices for the preprocessor tests, as sparse and as dense AnnData."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp


def make_counts(n_cells: int = 240, n_genes: int = 120, seed: int = 0, dense: bool = False) -> ad.AnnData:
    """Negative-binomial counts with three cell clusters, donors, batches and a binary label.

    Genes include mitochondrial (MT-) and ribosomal (RPL/RPS) names so QC metrics are non-trivial.
    ``X`` holds the counts (float32), as a fresh AnnData built by hand would.
    """
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, 3, n_cells)
    programs = rng.lognormal(0.0, 1.0, (3, n_genes))
    depth = rng.lognormal(np.log(800), 0.4, n_cells)
    base = rng.dirichlet(np.full(n_genes, 0.5))
    mean = depth[:, None] * base[None, :] * programs[cluster] / programs.mean(axis=0)
    counts = rng.negative_binomial(4, 4 / (4 + mean)).astype(np.float32)
    genes = [f"GENE{i}" for i in range(n_genes)]
    genes[:4] = ["MT-CO1", "MT-ND1", "MT-ATP6", "MT-CYB"]
    genes[4:8] = ["RPL3", "RPL4", "RPS6", "RPS8"]
    donors = np.array([f"donor{i}" for i in range(8)])
    donor = donors[rng.integers(0, 8, n_cells)]
    label = np.where(np.isin(donor, donors[:4]), "AD", "control")
    obs = pd.DataFrame(
        {
            "donor": pd.Categorical(donor),
            "batch": pd.Categorical(np.where(np.isin(donor, donors[::2]), "b1", "b2")),
            "label": pd.Categorical(label),
            "cell_type": pd.Categorical(np.array(["astro", "micro", "neuron"])[cluster]),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    X = counts if dense else sp.csr_matrix(counts)
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))


@pytest.fixture(params=["sparse", "dense"])
def counts_adata(request) -> ad.AnnData:
    """The same counts, once as CSR and once as a dense array."""
    return make_counts(dense=request.param == "dense")


@pytest.fixture
def make_adata():
    """The ``make_counts`` factory, for tests that need other sizes or seeds."""
    return make_counts
