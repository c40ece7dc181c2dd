"""Data sets that ship inside scanpy, so a recipe runs with no download and no shared data."""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import Field

from grnx_core import ComponentParams, DataError, DataSource
from grnx_plugins.data._common import record_source


def krumsiek11_network() -> pd.DataFrame:
    """The true network of scanpy's krumsiek11 simulation, read from the model file scanpy ships.

    The model's coupling list has one line per edge, ``target  regulator  strength`` (Krumsiek et
    al. 2011, Table 1): 30 edges, 4 of them self-loops. Returned as regulator -> target with the
    sign of the coupling.
    """
    import scanpy

    model_file = Path(scanpy.__file__).parent / "sim_models" / "krumsiek11.txt"
    if not model_file.exists():
        raise DataError(f"scanpy's krumsiek11 model file is missing ({model_file}); reinstall scanpy.")
    edges = []
    in_coupling_list = False
    for line in model_file.read_text().splitlines():
        if line.startswith("# coupling list"):
            in_coupling_list = True
            continue
        if in_coupling_list and line.strip() and not line.startswith("#"):
            target, regulator, strength = re.split(r"\s+", line.strip())
            edges.append((regulator, target, int(np.sign(float(strength)))))
    return pd.DataFrame(edges, columns=["source", "target", "sign"])


@functools.lru_cache(maxsize=2)
def _bundled_obs_columns(dataset: str) -> tuple[str, ...]:
    """obs columns of a dataset bundled with scanpy (small files read once per process)."""
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = sc.datasets.krumsiek11() if dataset == "krumsiek11" else sc.datasets.pbmc68k_reduced()
    return tuple(map(str, loaded.obs.columns))


class ScanpyBuiltin(DataSource):
    name = "scanpy_builtin"
    description = "scanpy's bundled krumsiek11 (with its true network) or pbmc68k_reduced (counts rebuilt)."
    reference = "https://doi.org/10.1186/s13059-017-1382-0"

    class Params(ComponentParams):
        dataset: Literal["krumsiek11", "pbmc68k_reduced"] = Field(
            description="krumsiek11: 640 simulated myeloid cells x 11 genes with the true 30-edge network; "
            "pbmc68k_reduced: 700 PBMCs x 765 genes, integer counts rebuilt from .raw and obs['n_counts']"
        )

    dataset: str

    def obs_columns(self) -> list[str] | None:
        return list(_bundled_obs_columns(self.dataset))

    def load(self):
        import scanpy as sc

        if self.dataset == "krumsiek11":
            with warnings.catch_warnings():
                # scanpy builds the obs names from the simulation time points; made unique below.
                warnings.filterwarnings("ignore", message="Observation names are not unique")
                adata = sc.datasets.krumsiek11()
            adata.obs_names_make_unique()
            # h5ad needs string keys; scanpy keys the highlighted cells by index.
            adata.uns["highlights"] = {str(k): v for k, v in adata.uns.get("highlights", {}).items()}
            # Simulated continuous expression: there are no counts to keep.
            record_source(adata, self.name, None, dataset="krumsiek11")
            return adata
        return self._pbmc68k_counts()

    def _pbmc68k_counts(self):
        """Rebuild integer UMI counts: ``.raw`` is log1p(counts / n_counts * 10,000)."""
        import anndata
        import scanpy as sc

        reduced = sc.datasets.pbmc68k_reduced()
        log_normalised = reduced.raw.X
        log_normalised = (
            log_normalised.toarray() if sp.issparse(log_normalised) else np.asarray(log_normalised)
        )
        depth = reduced.obs["n_counts"].to_numpy(dtype=np.float64)[:, None]
        rebuilt = np.expm1(log_normalised.astype(np.float64)) * depth / 10_000
        counts = np.rint(rebuilt)
        worst = float(np.abs(rebuilt - counts).max())
        if worst > 0.25:  # float32 storage leaves ~0.1; more means the formula no longer holds
            raise DataError(
                f"pbmc68k_reduced: counts rebuilt from .raw are {worst:.2f} away from integers; "
                "this scanpy version stores the data differently."
            )
        counts = sp.csr_matrix(counts.astype(np.float32))
        adata = anndata.AnnData(
            X=counts.copy(), obs=reduced.obs.copy(), var=pd.DataFrame(index=reduced.raw.var_names.copy())
        )
        adata.layers["counts"] = counts
        record_source(adata, self.name, "layers/counts", dataset="pbmc68k_reduced")
        return adata

    def ground_truth(self) -> pd.DataFrame | None:
        return krumsiek11_network() if self.dataset == "krumsiek11" else None

    def ground_truth_directed(self) -> bool:
        return True
