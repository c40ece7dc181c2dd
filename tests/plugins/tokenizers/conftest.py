"""Fixtures for the tokenizer tests: the real PBMC 3k subset (Ensembl ids) and small count matrices."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp


@pytest.fixture(scope="session")
def geneformer_dir(shared_data: Path) -> Path:
    folder = shared_data / "geneformer"
    if not folder.is_dir():
        pytest.skip(f"Geneformer dictionaries not found at {folder}")
    return folder


@pytest.fixture(scope="session")
def pbmc3k(shared_data: Path) -> ad.AnnData:
    """200 PBMCs x 1,000 genes, integer UMIs, var_names = Ensembl ids (10x PBMC 3k via Dino), and obs
    ``cell_type``, ``donor`` (random) and ``n_counts`` (the total over a whole transcriptome, here 2.5x
    the subset's row sum)."""
    import scanpy as sc

    folder = shared_data / "scrna" / "pbmc3k_small"
    if not folder.is_dir():
        pytest.skip(f"pbmc3k_small not found at {folder}")
    adata = sc.read_mtx(folder / "matrix.mtx").T
    adata.X = sp.csr_matrix(adata.X)
    adata.var_names = pd.read_csv(folder / "genes.tsv", header=None)[0].astype(str).to_numpy()
    adata.obs_names = pd.read_csv(folder / "barcodes.tsv", header=None)[0].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    adata.obs["cell_type"] = pd.Categorical(rng.choice(["B", "T", "NK"], adata.n_obs))
    adata.obs["donor"] = rng.integers(0, 4, adata.n_obs)
    # Geneformer's required total per cell: counts of genes outside this 1,000-gene subset included.
    adata.obs["n_counts"] = np.round(np.asarray(adata.X.sum(axis=1), dtype=np.float64).ravel() * 2.5)
    return adata


def _random_counts(
    n_cells: int, n_genes: int, density: float, seed: int, max_count: int = 30
) -> sp.csr_matrix:
    """Integer counts with many ties (small counts), as CSR float32."""
    rng = np.random.default_rng(seed)
    matrix = sp.random(
        n_cells,
        n_genes,
        density=density,
        format="csr",
        random_state=rng,
        data_rvs=lambda k: rng.integers(1, max_count, k),
    )
    return matrix.astype(np.float32)


@pytest.fixture(scope="session")
def random_counts():
    """``random_counts(n_cells, n_genes, density, seed, max_count=30)``: a CSR count matrix."""
    return _random_counts
