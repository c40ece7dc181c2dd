"""geosketch, scsampler and kernel_herding give exactly what their packages give on the same inputs."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pydantic
import pytest
import scanpy as sc
import scipy.sparse as sp

from grnx_core.errors import DataError
from grnx_plugins.samplers.geosketch import GeometricSketchSampler
from grnx_plugins.samplers.kernel_herding import KernelHerdingSampler
from grnx_plugins.samplers.scsampler import ScSampler


def two_populations(seed: int = 0, n_common: int = 380, n_rare: int = 20) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    common = rng.gamma(1.0, 2.0, 80)
    rare = np.roll(common, 40) * 3
    counts = np.vstack([rng.poisson(common, (n_common, 80)), rng.poisson(rare, (n_rare, 80))]).astype(
        np.float32
    )
    counts[:, 0] += 1  # no empty cell
    adata = ad.AnnData(X=sp.csr_matrix(counts))
    adata.obs["state"] = ["common"] * n_common + ["rare"] * n_rare
    return adata


def package_seed(generator_seed: int) -> int:
    # The documented rule: the first draw of the sampler's generator in [0, 2^31 - 1).
    return int(np.random.default_rng(generator_seed).integers(0, 2**31 - 1))


def reference_pca(adata: ad.AnnData, n_pcs: int = 50) -> np.ndarray:
    """The documented fallback PCA, computed with scanpy here: normalise to 1e4, log1p, arpack, state 0."""
    copy = ad.AnnData(X=adata.X.copy())
    sc.pp.normalize_total(copy, target_sum=1e4)
    sc.pp.log1p(copy)
    sc.pp.pca(
        copy, n_comps=min(n_pcs, adata.n_obs - 1, adata.n_vars - 1), svd_solver="arpack", random_state=0
    )
    return copy.obsm["X_pca"].astype(np.float64)


@pytest.fixture
def with_pca() -> ad.AnnData:
    adata = two_populations()
    adata.obsm["X_pca"] = np.random.default_rng(5).normal(size=(adata.n_obs, 12)) * 3
    return adata


def test_geosketch_equals_the_package(with_pca):
    import geosketch

    sample = GeometricSketchSampler(n_cells=40).sample(with_pca, np.random.default_rng(9))
    expected = geosketch.gs(with_pca.obsm["X_pca"], 40, seed=package_seed(9), replace=False)
    np.testing.assert_array_equal(sample.indices, np.sort(expected))
    np.testing.assert_array_equal(sample.weights, np.ones(40))
    assert sample.n_cells_total == with_pca.n_obs


def test_geosketch_on_the_fallback_pca_equals_the_package():
    import geosketch

    adata = two_populations(seed=1)
    sample = GeometricSketchSampler(fraction=0.1, n_pcs=10, n_boxes=30).sample(
        adata, np.random.default_rng(2)
    )
    coordinates = reference_pca(adata, 10)
    expected = geosketch.gs(coordinates, 40, k=30, seed=package_seed(2), replace=False)
    np.testing.assert_array_equal(sample.indices, np.sort(expected))
    assert "X_pca" not in adata.obsm  # the fallback PCA is never written back


def test_scsampler_equals_the_package(with_pca, monkeypatch):
    import scsampler

    sample = ScSampler(n_cells=40).sample(with_pca, np.random.default_rng(4))
    # The package under NumPy 2 needs its single-element randint as a scalar: patch numpy itself here.
    original = np.random.randint

    def scalar_randint(*args, size=None, **kwargs):
        drawn = original(*args, size=size, **kwargs)
        return drawn[0] if size == 1 else drawn

    monkeypatch.setattr(np.random, "randint", scalar_randint)
    expected = scsampler.scsampler(with_pca.obsm["X_pca"], n_obs=40, random_state=package_seed(4))
    np.testing.assert_array_equal(sample.indices, np.sort(expected))
    monkeypatch.undo()
    split = ScSampler(n_cells=40, random_split=2).sample(with_pca, np.random.default_rng(4))
    monkeypatch.setattr(np.random, "randint", scalar_randint)
    expected = scsampler.scsampler(
        with_pca.obsm["X_pca"], n_obs=40, random_state=package_seed(4), random_split=2
    )
    np.testing.assert_array_equal(split.indices, np.sort(expected))


def test_kernel_herding_equals_the_package(with_pca):
    from sketchKH import sketch

    sample = KernelHerdingSampler(n_cells=40, gamma=3.0).sample(with_pca, np.random.default_rng(6))
    coordinates = ad.AnnData(X=with_pca.obsm["X_pca"])
    indices, _ = sketch(coordinates, gamma=3.0, frequency_seed=package_seed(6), num_subsamples=40)
    np.testing.assert_array_equal(sample.indices, np.sort(indices[0]))


def test_the_global_numpy_random_state_is_left_alone(with_pca):
    np.random.seed(123)
    expected = np.random.random_sample(3)
    np.random.seed(123)
    GeometricSketchSampler(n_cells=20).sample(with_pca, np.random.default_rng(0))
    ScSampler(n_cells=20).sample(with_pca, np.random.default_rng(0))
    np.testing.assert_array_equal(np.random.random_sample(3), expected)
    assert np.random.randint(10, size=1).shape == (1,)  # the scsampler shim is undone


@pytest.mark.parametrize("cls", [GeometricSketchSampler, ScSampler, KernelHerdingSampler])
def test_bad_inputs_are_refused(cls):
    with pytest.raises(pydantic.ValidationError):
        cls(fraction=0.1, n_cells=3)
    adata = two_populations()
    with pytest.raises(DataError, match="n_cells=401 is more than the 400 cells"):
        cls(n_cells=401).sample(adata, np.random.default_rng(0))
    adata.obsm["X_pca"] = np.ones((adata.n_obs, 3))
    with pytest.raises(DataError, match="same PCA coordinates"):
        cls(n_cells=10).sample(adata, np.random.default_rng(0))
    adata.obsm["X_pca"] = np.full((adata.n_obs, 3), np.nan)
    with pytest.raises(DataError, match="non-finite"):
        cls(n_cells=10).sample(adata, np.random.default_rng(0))
