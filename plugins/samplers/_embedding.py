"""The PCA coordinates the geometric samplers (geosketch, scsampler, kernel herding) work in.

``obsm[key]`` (``X_pca`` by default, as the ``pca`` preprocessor writes it) when the data has it.
Otherwise a PCA is computed on a private copy, never written back: the counts
(``layers["counts"]`` when present, else ``X``), scaled to 10,000 per cell, log1p, then
``min(n_pcs, n_cells - 1, n_genes - 1)`` components with scanpy's ``pp.pca`` (arpack solver, random
state 0, so the coordinates do not change with the sampler's seed). This is the convention of the
figure helpers in ``grnx_plugins.preprocess._common``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anndata
import numpy as np
import scipy.sparse as sp
from pydantic import Field

from grnx_core import CellSample
from grnx_core.errors import DataError
from grnx_plugins.samplers._sample_size import SampleSizeParams, sample_size

#: Random state of the fallback PCA (fixed: the sampler's seed must not move the coordinates).
PCA_SEED = 0


class EmbeddingSampleParams(SampleSizeParams):
    """How many cells to draw, and the PCA coordinates to draw them in."""

    obsm_key: str = Field(
        "X_pca",
        description="obsm key of the coordinates (e.g. X_pca from the pca preprocessor); when absent, a "
        "PCA of the log1p-normalised counts with a fixed random state is computed",
    )
    n_pcs: int = Field(50, ge=1, description="leading components used (of obsm_key, or of the computed PCA)")


def pca_coordinates(adata: anndata.AnnData, key: str, n_pcs: int, who: str) -> np.ndarray:
    """``(n_cells, d)`` float64 coordinates: ``obsm[key]`` (first ``n_pcs`` columns) or a fresh PCA."""
    if key in adata.obsm:
        coordinates = np.asarray(adata.obsm[key], dtype=np.float64)
        if coordinates.ndim != 2 or coordinates.shape[0] != adata.n_obs:
            raise DataError(
                f"{who}: obsm[{key!r}] has shape {coordinates.shape}, expected (n_cells={adata.n_obs}, "
                f"components). Recompute it (the 'pca' preprocessor) or name another obsm key."
            )
        coordinates = coordinates[:, :n_pcs]
    else:
        coordinates = _fresh_pca(adata, n_pcs, who)
    if not np.isfinite(coordinates).all():
        raise DataError(
            f"{who}: the PCA coordinates (obsm[{key!r}] or the fallback PCA) hold non-finite values; "
            f"fix the embedding or drop the cells with missing values."
        )
    if np.ptp(coordinates, axis=0).max(initial=0.0) == 0.0:
        raise DataError(
            f"{who}: every cell has the same PCA coordinates, so there is no geometry to diversify "
            f"over. Check the expression (all cells identical?) or the embedding in obsm[{key!r}]."
        )
    return coordinates


def _fresh_pca(adata: anndata.AnnData, n_pcs: int, who: str) -> np.ndarray:
    import scanpy as sc

    n_components = min(n_pcs, adata.n_obs - 1, adata.n_vars - 1)
    if n_components < 1:
        raise DataError(
            f"{who}: {adata.n_obs} cells x {adata.n_vars} genes are too few for a PCA; sample from "
            f"more cells or give coordinates in obsm."
        )
    source = adata.layers["counts"] if "counts" in adata.layers else adata.X
    if source is None:
        raise DataError(f"{who}: the data has neither X nor layers['counts'] to compute a PCA from.")
    matrix = sp.csr_matrix(source, dtype=np.float32, copy=True) if sp.issparse(source) else source
    matrix = np.array(matrix, dtype=np.float32) if not sp.issparse(matrix) else matrix
    values = matrix.data if sp.issparse(matrix) else matrix
    if values.size and (not np.isfinite(values).all() or values.min() < 0):
        raise DataError(
            f"{who}: the expression used for the fallback PCA (layers['counts'] or X) holds negative or "
            f"non-finite values; it expects counts. Add the 'pca' preprocessor first (obsm['X_pca'])."
        )
    copy = anndata.AnnData(X=matrix)
    sc.pp.normalize_total(copy, target_sum=1e4)
    sc.pp.log1p(copy)
    sc.pp.pca(copy, n_comps=n_components, svd_solver="arpack", random_state=PCA_SEED)
    return np.asarray(copy.obsm["X_pca"], dtype=np.float64)


@dataclass
class EmbeddingDraw:
    """What every package sampler starts from: the cells to draw, the coordinates, the seed."""

    who: str
    n_obs: int
    n_draw: int
    coordinates: np.ndarray
    seed: int

    @classmethod
    def prepare(cls, sampler: Any, adata: anndata.AnnData, rng: np.random.Generator) -> EmbeddingDraw:
        from grnx_plugins.samplers._legacy_random import package_seed

        who = f"sampler {sampler.name!r}"
        n_draw = sample_size(adata.n_obs, sampler.fraction, sampler.n_cells, who)
        coordinates = pca_coordinates(adata, sampler.obsm_key, sampler.n_pcs, who)
        return cls(who, adata.n_obs, n_draw, coordinates, package_seed(rng))

    def sample(self, name: str, indices: np.ndarray, **info: Any) -> CellSample:
        """The unweighted sample of ``indices`` (sorted), with what the draw used in its info."""
        indices = np.sort(np.asarray(indices, dtype=np.int64))
        return CellSample(
            indices=indices,
            weights=np.ones(indices.size),
            n_cells_total=self.n_obs,
            info={
                "sampler": name,
                "n_cells_sampled": int(indices.size),
                "fraction_sampled": indices.size / self.n_obs,
                "n_dimensions": int(self.coordinates.shape[1]),
                "package_seed": self.seed,
                **info,
            },
        )
