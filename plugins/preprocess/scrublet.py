"""Doublet detection with Scrublet, per batch (scanpy ``pp.scrublet``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from grnx_core import ComponentParams, Preprocessor
from grnx_core.components import role_field, seed_field
from grnx_core.errors import DataError
from grnx_plugins.preprocess._common import (
    counts_matrix,
    obs_subset,
    require_in_memory,
    require_obs,
    role_of,
    scanpy_knn_is_broken,
    seed_or_zero,
    umap_figures,
)

if TYPE_CHECKING:
    import anndata
    import matplotlib.figure


class Scrublet(Preprocessor):
    """Scores every cell against simulated doublets of its own batch; flags or removes predicted doublets.

    Reads the raw counts (``layers["counts"]``, else ``X``; checked to be integers) without changing
    them. Writes ``obs["doublet_score"]``, ``obs["predicted_doublet"]`` and ``uns["scrublet"]``
    (per-batch thresholds and rates, from scanpy) plus ``uns["scrublet_summary"]`` (cells scored and
    removed). Doublets form between cells of one library, so ``batch_key`` should name the 10x
    library / batch column, as in the ROSMAP atlas; it defaults to the recipe's ``data.batch_key``,
    and all cells are scored at once (one library) when neither is set. Where scanpy's approximate
    neighbours are broken (scipy >= 1.14 with scanpy 1.11) and a batch plus its simulated doublets
    reach 8,192 cells, the doublet neighbours are found exactly (brute force): same scores as
    scanpy's small-data path, quadratic time in the batch size. Seeded: the seed drives the doublet
    simulation and the figure's cell subset, the same seed giving the same scores; in a recipe it
    derives from the recipe seed unless set, in Python None acts as 0.
    """

    name = "scrublet"
    description = "Scrublet doublet scores per batch; flag or remove predicted doublets (scanpy pp.scrublet)."
    reference = "https://doi.org/10.1016/j.cels.2018.11.005"
    writes = ("obs/doublet_score", "obs/predicted_doublet", "uns/scrublet", "uns/scrublet_summary")

    class Params(ComponentParams):
        batch_key: str | None = role_field(
            "batch_key",
            "obs column of the batch (library), each scored on its own (all cells together if "
            "data.batch_key is unset too)",
        )
        action: Literal["flag", "remove"] = Field("flag", description="flag doublets in obs, or remove them")
        expected_doublet_rate: float = Field(0.05, gt=0, lt=1, description="expected fraction of doublets")
        sim_doublet_ratio: float = Field(2.0, gt=0, description="simulated doublets per observed cell")
        n_prin_comps: int = Field(30, ge=2, description="principal components of the doublet embedding")
        threshold: float | None = Field(
            None, ge=0, le=1, description="doublet-score threshold; set automatically per batch when None"
        )
        seed: int | None = seed_field("random state of the doublet simulation")
        color_by: list[str] = Field(
            default_factory=list, description="more obs columns to colour the figure by"
        )
        figure_max_cells: int = Field(20_000, ge=10, description="cells drawn in the figure (random subset)")

    def __call__(self, adata: anndata.AnnData) -> anndata.AnnData:
        import anndata as ad
        import pandas as pd
        import scanpy as sc

        require_in_memory(adata, self.name)
        # CSR whatever the input: scanpy's scrublet runs its PCA on the layout it is given, and dense
        # and sparse counts gave doublet scores up to 0.008 apart (the contract suite's sparse/dense check).
        import scipy.sparse as sp

        counts = sp.csr_matrix(counts_matrix(adata, self.name))
        obs = pd.DataFrame(index=adata.obs_names.copy())
        if self.batch_key is not None:
            batches = require_obs(adata, self.batch_key, self.name, "batch_key", role_of(self, "batch_key"))
            obs["batch"] = batches.to_numpy()
            sizes = batches.value_counts()
            small = sizes[sizes <= self.n_prin_comps]
            if len(small):
                raise DataError(
                    f"preprocessor 'scrublet': batch(es) {', '.join(map(str, small.index[:5]))} of "
                    f"{self.batch_key!r} have {', '.join(map(str, small.to_numpy()[:5]))} cells, too few for "
                    f"{self.n_prin_comps} principal components. Merge small batches, lower n_prin_comps, or "
                    f"filter them out first."
                )
        elif adata.n_obs <= self.n_prin_comps:
            raise DataError(
                f"preprocessor 'scrublet': {adata.n_obs} cells are too few for {self.n_prin_comps} PCs."
            )
        # A light AnnData over the same counts: scanpy's scrublet copies what it transforms.
        light = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=adata.var_names.copy()))
        largest = int(obs["batch"].value_counts().max()) if self.batch_key is not None else adata.n_obs
        # scanpy's approximate neighbours fail on this scipy from 8,192 points (see the neighbors
        # step); scrublet takes no transformer, so it gets exact (brute-force) neighbours there.
        exact = True if scanpy_knn_is_broken() and largest * (1 + self.sim_doublet_ratio) >= 8192 else None
        try:
            sc.pp.scrublet(
                light,
                batch_key="batch" if self.batch_key is not None else None,
                sim_doublet_ratio=self.sim_doublet_ratio,
                expected_doublet_rate=self.expected_doublet_rate,
                n_prin_comps=self.n_prin_comps,
                threshold=self.threshold,
                random_state=seed_or_zero(self.seed),
                verbose=False,
                use_approx_neighbors=False if exact else None,
            )
        except ValueError as error:
            if "n_components" not in str(error):
                raise
            # Scrublet keeps only variable genes (per batch); too few of them for the requested PCs.
            raise DataError(
                f"preprocessor 'scrublet': too few variable genes for n_prin_comps={self.n_prin_comps} "
                f"({error}). Lower n_prin_comps, or run scrublet on more genes / larger batches."
            ) from error
        adata.obs["doublet_score"] = light.obs["doublet_score"].to_numpy()
        adata.obs["predicted_doublet"] = light.obs["predicted_doublet"].to_numpy(dtype=bool)
        adata.uns["scrublet"] = light.uns.get("scrublet", {})
        n_doublets = int(adata.obs["predicted_doublet"].sum())
        adata.uns["scrublet_summary"] = {
            "n_cells": int(adata.n_obs),
            "n_predicted_doublets": n_doublets,
            "n_removed": n_doublets if self.action == "remove" else 0,
            "action": self.action,
        }
        if self.action == "remove":
            adata = obs_subset(adata, ~adata.obs["predicted_doublet"].to_numpy())
        return adata

    def figures(self, adata: anndata.AnnData) -> dict[str, matplotlib.figure.Figure]:
        keys = [self.batch_key, "doublet_score", "predicted_doublet", *self.color_by]
        summary = adata.uns.get("scrublet_summary", {})
        title = (
            f"Scrublet: {summary.get('n_predicted_doublets', '?')} predicted doublets of "
            f"{summary.get('n_cells', '?')} cells ({self.action})"
        )
        return umap_figures(
            adata,
            [k for k in keys if k],
            "scrublet_umap",
            title,
            self.figure_max_cells,
            seed_or_zero(self.seed),
        )
