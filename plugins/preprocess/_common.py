"""Helpers shared by the preprocessors: seeds, obs and role checks, the counts layer, and UMAP figures."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from grnx_core.errors import DataError
from grnx_plugins.data._common import describe_non_counts, is_count_matrix

if TYPE_CHECKING:
    import anndata
    import matplotlib.figure

    from grnx_core import Preprocessor


def seed_or_zero(seed: int | None) -> int:
    """The seed a step uses: ``seed``, or 0 when None.

    A recipe fills every unset ``seed`` from the recipe seed and the step before the step is built,
    so None only reaches a step built in Python outside a recipe; it then behaves as seed 0, the
    same on every call.
    """
    return 0 if seed is None else seed


def _available(adata: anndata.AnnData) -> str:
    return ", ".join(map(str, adata.obs.columns[:30])) or "no obs columns"


def require_obs(
    adata: anndata.AnnData, key: str, who: str, parameter: str, role: str | None = None
) -> pd.Series:
    """``adata.obs[key]``, or a DataError naming the parameter and the columns that exist.

    ``role`` names the data role (``data.<role>``) the parameter defaults to, if it has one.
    """
    if key not in adata.obs.columns:
        fix = f"{parameter} (or data.{role}, which it defaults to)" if role else parameter
        raise DataError(
            f"preprocessor {who!r}: {parameter} is {key!r}, but obs has no such column. Available: "
            f"{_available(adata)}. Set {fix} to one of them."
        )
    return adata.obs[key]


def role_of(component: Preprocessor, parameter: str) -> str:
    """The data role a ``role_field`` parameter defaults to (``label_key`` for ``data.label_key``)."""
    extra = type(component).Params.model_fields[parameter].json_schema_extra
    return extra["grnx_role"]  # type: ignore[index]


def require_role(adata: anndata.AnnData, component: Preprocessor, parameter: str) -> pd.Series:
    """``adata.obs`` column named by a ``role_field`` parameter the component cannot do without.

    The recipe fills the parameter from ``data.<role>`` when it is left None; it is still None when
    the recipe sets neither (or the step was built in Python without it), and the DataError then
    says which to set.
    """
    key, role = getattr(component, parameter), role_of(component, parameter)
    if key is None:
        what = role.removesuffix("_key").replace("_", " ")
        raise DataError(
            f"preprocessor {component.name!r} needs {parameter}, the obs column of the {what}, but it is "
            f"not set and the recipe sets no data.{role} for it to default to. Set {parameter} in the "
            f"step's params or data.{role} in the recipe. Available obs columns: {_available(adata)}."
        )
    return require_obs(adata, key, component.name, parameter, role)


def require_in_memory(adata: anndata.AnnData, who: str) -> None:
    if adata.isbacked:
        raise DataError(
            f"preprocessor {who!r} needs the data in memory, but it is backed on disk. Set "
            f"data.params.backed: false, or put a cell-selecting step (select_cells, keep_annotated) first."
        )


def require_neighbour_graph(adata: anndata.AnnData, who: str) -> None:
    if "connectivities" not in adata.obsp:
        raise DataError(
            f"preprocessor {who!r} needs the neighbour graph; add the 'neighbors' step before it."
        )


def keep_counts(adata: anndata.AnnData) -> None:
    """Before a step changes ``X``: keep ``X`` in ``layers["counts"]`` if it still holds raw counts.

    Data sources already write the layer; this covers AnnData built by hand. A separate copy is
    needed because scanpy rescales float matrices in place.
    """
    if "counts" not in adata.layers and is_count_matrix(adata.X):
        adata.layers["counts"] = adata.X.copy()


def counts_matrix(adata: anndata.AnnData, who: str):
    """The raw counts (``layers["counts"]``, else ``X`` when it holds counts), checked."""
    if "counts" in adata.layers:
        counts, where = adata.layers["counts"], 'layers["counts"]'
    else:
        counts, where = adata.X, "X"
    if not is_count_matrix(counts):
        raise DataError(
            f"preprocessor {who!r} needs raw integer counts, but {describe_non_counts(counts, where)}. "
            f"Run it before normalize_total/log1p, or load the data with its raw counts (data sources "
            f"keep them in layers['counts'])."
        )
    return counts


def obs_subset(adata: anndata.AnnData, keep: np.ndarray) -> anndata.AnnData:
    """The kept cells as a new in-memory AnnData (backed data: only the kept rows are read)."""
    if keep.all():
        return adata
    subset = adata[keep]
    subset = subset.to_memory() if adata.isbacked else subset.copy()
    for column in subset.obs.select_dtypes("category").columns:
        subset.obs[column] = subset.obs[column].cat.remove_unused_categories()
    return subset


# ---------------------------------------------------------------------------------------------
# k-nearest neighbours
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _pynndescent_matrix_transformer():
    """PyNNDescentTransformer returning ``csr_matrix``.

    With scipy >= 1.14 pynndescent 0.7 returns ``csr_array``, which has no ``getnnz``; scanpy 1.11
    calls ``getnnz`` on it, so ``sc.pp.neighbors`` fails for data where it picks pynndescent (8,192
    or more cells with the euclidean metric). Converting the output back is the whole fix.
    """
    import scipy.sparse as sp
    from pynndescent import PyNNDescentTransformer

    class MatrixOutput(PyNNDescentTransformer):
        def transform(self, X, y=None):
            return sp.csr_matrix(super().transform(X, y))

        def fit_transform(self, X, y=None, **fit_params):
            return sp.csr_matrix(super().fit_transform(X, y, **fit_params))

    return MatrixOutput


def scanpy_knn_is_broken() -> bool:
    """True when scanpy's approximate-neighbour path fails (scipy without ``csr_array.getnnz``)."""
    import scipy.sparse as sp

    return not hasattr(sp.csr_array, "getnnz")


def knn_transformer(n_obs: int, n_neighbors: int, metric: str, seed: int):
    """``None`` (scanpy's own choice) unless scanpy would use pynndescent on a scipy without
    ``csr_array.getnnz``; then an equivalent transformer with scanpy's settings (UMAP's defaults)."""
    from scanpy import settings

    if not scanpy_knn_is_broken():
        return None
    if (metric == "euclidean" and n_obs < 8192) or n_obs < 4096:
        return None  # scanpy uses exact brute-force neighbours here
    return _pynndescent_matrix_transformer()(
        n_neighbors=n_neighbors,
        metric=metric,
        random_state=seed,
        n_jobs=settings.n_jobs,
        n_trees=min(64, 5 + round(n_obs**0.5 / 20.0)),
        n_iters=max(5, round(np.log2(n_obs))),
    )


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def umap_coordinates(adata: anndata.AnnData, max_cells: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """UMAP coordinates for (at most ``max_cells``) cells and the row indices they belong to.

    Uses ``obsm["X_umap"]`` when present. Otherwise embeds a random subset of cells on a copy
    (from ``obsm["X_pca"]`` when present, else from the counts: normalise, log1p, 50 PCs, 15
    neighbours), so drawing a figure never changes the AnnData the pipeline continues with.
    """
    import scanpy as sc

    rng = np.random.default_rng(seed)
    rows = np.arange(adata.n_obs)
    if adata.n_obs > max_cells:
        rows = np.sort(rng.choice(adata.n_obs, size=max_cells, replace=False))
    if "X_umap" in adata.obsm:
        return np.asarray(adata.obsm["X_umap"])[rows, :2], rows
    subset = adata[rows]
    if "X_pca" in adata.obsm:
        small = sc.AnnData(X=np.zeros((len(rows), 1), dtype=np.float32), obsm={"X_pca": subset.obsm["X_pca"]})
    else:
        matrix = subset.layers["counts"] if "counts" in subset.layers else subset.X
        small = sc.AnnData(X=matrix.copy() if hasattr(matrix, "copy") else np.array(matrix))
        small.X = small.X.astype(np.float32)
        sc.pp.normalize_total(small)
        sc.pp.log1p(small)
        n_comps = max(1, min(50, small.n_obs - 1, small.n_vars - 1))
        sc.pp.pca(small, n_comps=n_comps, random_state=seed)
    n_neighbors = max(2, min(15, small.n_obs - 1))
    sc.pp.neighbors(
        small,
        n_neighbors=n_neighbors,
        use_rep="X_pca",
        random_state=seed,
        transformer=knn_transformer(small.n_obs, n_neighbors, "euclidean", seed),
    )
    sc.tl.umap(small, random_state=seed)
    return small.obsm["X_umap"], rows


def embedding_figure(
    coordinates: np.ndarray, colors: dict[str, pd.Series], title: str
) -> matplotlib.figure.Figure:
    """One scatter panel per colour: categories with a legend, numbers with a colour bar."""
    from matplotlib.figure import Figure

    n_panels = max(1, len(colors))
    figure = Figure(figsize=(5.0 * n_panels, 4.0), layout="constrained")
    axes = figure.subplots(1, n_panels, squeeze=False)[0]
    size = max(0.5, min(20.0, 20_000 / max(len(coordinates), 1)))
    items = list(colors.items()) or [("cells", None)]
    for ax, (name, values) in zip(axes, items):
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP1")
        ax.set_ylabel("UMAP2")
        if values is None:
            ax.scatter(coordinates[:, 0], coordinates[:, 1], s=size, c="grey", linewidths=0)
            continue
        if isinstance(values.dtype, pd.CategoricalDtype) or values.dtype == object or values.dtype == bool:
            order = (
                values.cat.categories
                if isinstance(values.dtype, pd.CategoricalDtype)
                else sorted(pd.unique(values.astype(str)))
            )
            categories = pd.Categorical(values.astype(str), categories=[str(c) for c in order])
            palette = _palette(len(categories.categories))
            for code, category in enumerate(categories.categories):
                mask = categories.codes == code
                ax.scatter(
                    coordinates[mask, 0],
                    coordinates[mask, 1],
                    s=size,
                    color=palette[code],
                    linewidths=0,
                    label=str(category),
                )
            if len(categories.categories) <= 30:
                ax.legend(
                    loc="center left",
                    bbox_to_anchor=(1.0, 0.5),
                    fontsize="small",
                    markerscale=max(1.0, 6 / size**0.5),
                    frameon=False,
                )
        else:
            points = ax.scatter(
                coordinates[:, 0],
                coordinates[:, 1],
                s=size,
                c=np.asarray(values, dtype=float),
                cmap="viridis",
                linewidths=0,
            )
            figure.colorbar(points, ax=ax, shrink=0.8)
    figure.suptitle(title)
    return figure


def _palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if n > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(n)]


def umap_figures(
    adata: anndata.AnnData, keys: Sequence[str], name: str, title: str, max_cells: int, seed: int
) -> dict[str, matplotlib.figure.Figure]:
    """``{name: figure}`` of a UMAP coloured by each obs key in ``keys`` that exists."""
    present = [k for k in dict.fromkeys(keys) if k and k in adata.obs.columns]
    coordinates, rows = umap_coordinates(adata, max_cells, seed)
    colors = {k: adata.obs[k].iloc[rows].reset_index(drop=True) for k in present}
    return {name: embedding_figure(coordinates, colors, title)}
