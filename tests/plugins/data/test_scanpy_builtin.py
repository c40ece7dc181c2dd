"""scanpy_builtin: krumsiek11 with its true network, pbmc68k_reduced with rebuilt integer counts."""

from __future__ import annotations

import numpy as np
import scanpy as sc

from grnx_plugins.data.scanpy_builtin import ScanpyBuiltin, krumsiek11_network


def test_krumsiek11_network_is_table_1_of_the_paper():
    network = krumsiek11_network()
    assert len(network) == 30  # Krumsiek et al. 2011, Table 1
    assert (network["source"] == network["target"]).sum() == 4
    # Spot checks from the paper: PU.1 represses GATA2; GFI1 is repressed by EgrNab; Fog1 needs Gata1.
    signs = {(s, t): sign for s, t, sign in network.itertuples(index=False)}
    assert signs[("Pu.1", "Gata2")] == -1
    assert signs[("EgrNab", "Gfi1")] == -1
    assert signs[("Gata1", "Fog1")] == 1


def test_krumsiek11_loads_with_unique_names_and_no_counts():
    source = ScanpyBuiltin(dataset="krumsiek11")
    adata = source.load()
    assert adata.shape == (640, 11) and adata.obs_names.is_unique
    assert adata.uns["grnx_data"]["counts"] == "none"
    assert set(source.ground_truth()["source"]) <= set(adata.var_names)


def test_pbmc68k_counts_reproduce_the_log_normalised_raw():
    adata = ScanpyBuiltin(dataset="pbmc68k_reduced").load()
    reference = sc.datasets.pbmc68k_reduced()
    counts = adata.layers["counts"].toarray()
    assert adata.shape == (700, 765)
    assert np.array_equal(counts, np.rint(counts)) and counts.min() >= 0
    depth = reference.obs["n_counts"].to_numpy()[:, None]
    rebuilt_log = np.log1p(counts / depth * 10_000)
    raw = reference.raw.X.toarray() if hasattr(reference.raw.X, "toarray") else reference.raw.X
    assert np.abs(rebuilt_log - raw).max() < 0.01
    assert list(adata.obs["bulk_labels"]) == list(reference.obs["bulk_labels"])
