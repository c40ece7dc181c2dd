"""Row chunks of an AnnData's expression as checked CSR matrices, for in-memory and backed data alike.

Backed AnnData (``anndata.read_h5ad(path, backed="r")``) keeps ``X`` on disk and is read here one
slice of rows at a time, so memory does not grow with the number of cells. anndata loads the
*layers* of a backed file into memory when it opens it, so only ``X`` is truly streamed.
"""

from __future__ import annotations

from collections.abc import Iterator

import anndata
import numpy as np
import scipy.sparse as sp

from grnx_core.errors import DataError


def expression_name(layer: str | None) -> str:
    return "X" if layer is None else f"layers[{layer!r}]"


def check_expression_source(adata: anndata.AnnData, layer: str | None, who: str) -> None:
    """Fail early when the expression to read does not exist."""
    if layer is None:
        if adata.X is None:
            raise DataError(
                f"{who}: the data has no X. Set sampler.params.layer to one of its layers "
                f"({', '.join(adata.layers.keys()) or 'none'})."
            )
    elif layer not in adata.layers:
        raise DataError(
            f"{who}: layer {layer!r} not found; the data has layers "
            f"[{', '.join(adata.layers.keys())}]. Set sampler.params.layer to one of them, or null for X."
        )


def _rows(adata: anndata.AnnData, layer: str | None):
    """A function ``(start, stop) -> rows`` reading from the cheapest place."""
    if adata.isbacked and layer is None and not adata.is_view:
        backed = adata.X  # h5py Dataset or anndata's backed sparse dataset: slicing reads rows from disk
        return lambda start, stop: backed[start:stop]
    if adata.isbacked:
        # Views of backed data: let anndata resolve the view's rows, one slice at a time.
        def read(start: int, stop: int):
            part = adata[start:stop]
            return part.X if layer is None else part.layers[layer]

        return read
    matrix = adata.X if layer is None else adata.layers[layer]
    return lambda start, stop: matrix[start:stop]


def iter_row_chunks(
    adata: anndata.AnnData, layer: str | None, chunk_size: int, who: str
) -> Iterator[tuple[int, sp.csr_matrix]]:
    """Yield ``(first row, chunk)`` with each chunk a canonical CSR matrix checked for Min-Max hashing.

    Checks: finite, non-negative values, and at least one non-zero per cell; stored zeros are
    dropped and duplicate entries summed. Errors name the first offending cell.
    """
    read = _rows(adata, layer)
    n_obs = adata.n_obs
    for start in range(0, n_obs, chunk_size):
        stop = min(n_obs, start + chunk_size)
        raw = read(start, stop)
        if sp.issparse(raw):
            # A private copy: canonicalising below must never touch the caller's matrix.
            chunk = sp.csr_matrix(raw, copy=True)
        else:
            chunk = sp.csr_matrix(np.asarray(raw))
        _check_chunk(adata, layer, start, chunk, who)
        yield start, chunk


def _check_chunk(
    adata: anndata.AnnData, layer: str | None, start: int, chunk: sp.csr_matrix, who: str
) -> None:
    where = expression_name(layer)
    data = chunk.data
    bad = ~np.isfinite(data)
    if bad.any():
        row = int(np.searchsorted(chunk.indptr, np.flatnonzero(bad)[0], side="right") - 1)
        raise DataError(
            f"{who}: {where} holds a non-finite value ({data[bad][0]}) in cell "
            f"{adata.obs_names[start + row]!r} (row {start + row}). Min-Max hashing needs finite, "
            f"non-negative expression: fix or drop that cell, or hash another layer."
        )
    negative = data < 0
    if negative.any():
        row = int(np.searchsorted(chunk.indptr, np.flatnonzero(negative)[0], side="right") - 1)
        raise DataError(
            f"{who}: {where} holds a negative value ({data[negative][0]:g}) in cell "
            f"{adata.obs_names[start + row]!r} (row {start + row}); the Min-Max kernel is defined for "
            f"non-negative expression. Hash counts or normalised counts (set sampler.params.layer, "
            f"e.g. to 'counts'), not scaled or centred data."
        )
    chunk.sum_duplicates()
    chunk.eliminate_zeros()
    empty = np.flatnonzero(np.diff(chunk.indptr) == 0)
    if empty.size:
        row = int(empty[0])
        raise DataError(
            f"{who}: cell {adata.obs_names[start + row]!r} (row {start + row}) has no non-zero "
            f"expression in {where} ({empty.size} such cells in rows {start}-{start + chunk.shape[0] - 1}); "
            f"an empty cell has no Min-Max hash. Drop empty cells first (e.g. the qc_filter "
            f"preprocessor with min_genes: 1)."
        )
