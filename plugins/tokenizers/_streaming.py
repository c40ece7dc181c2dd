"""Streaming machinery shared by the tokenizers: row-chunk readers, worker processes, output sinks.

A tokenizer describes its work as a picklable *plan* and a module-level *kernel*
``kernel(plan, block, per_row) -> ChunkTokens`` that turns one CSR row block into tokens.
:func:`tokenize_rows` reads the rows chunk by chunk (from memory, or straight from a backed
``.h5ad`` file), runs the kernel in this process or in worker processes, and streams the results in
chunk order into memory or into a :class:`~grnx_core.TokenizedCells` folder on disk. Peak memory is
a few chunks plus, when writing to disk, the per-cell offsets; the output does not depend on the
chunk size or the number of workers because each cell's tokens depend only on that cell.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from grnx_core.atomic import atomic_path
from grnx_core.data_types import TokenizedCells
from grnx_core.errors import DataError
from grnx_core.progress import progress

if TYPE_CHECKING:
    import anndata


# ---------------------------------------------------------------------------------------------
# Readers: row blocks of one matrix as CSR (float64 data, sorted column indices)
# ---------------------------------------------------------------------------------------------


def _as_csr(block: Any) -> sp.csr_matrix:
    if sp.issparse(block):
        block = sp.csr_matrix(block)
    else:
        block = sp.csr_matrix(np.asarray(block))
    # Kernels are compiled for float32/float64 values and int32/int64 column indices.
    if block.data.dtype not in (np.float32, np.float64):
        block.data = block.data.astype(np.float64)
    if block.indices.dtype not in (np.int32, np.int64):
        block.indices = block.indices.astype(np.int64)
    if not block.has_sorted_indices:
        block.sort_indices()
    return block


def _contiguous(rows: np.ndarray) -> bool:
    return len(rows) > 0 and rows[-1] - rows[0] + 1 == len(rows) and bool(np.all(np.diff(rows) == 1))


class MemoryReader:
    """Rows of an in-memory matrix (dense, CSR or CSC; CSC is converted once).

    ``dtype`` is the matrix's as stored (blocks are read as CSR whatever it is).
    """

    def __init__(self, matrix: Any) -> None:
        if sp.issparse(matrix) and matrix.format != "csr":
            matrix = matrix.tocsr()
        self.matrix = matrix
        self.dtype = np.dtype(matrix.dtype)
        self.n_rows, self.n_cols = matrix.shape

    def read(self, rows: np.ndarray) -> sp.csr_matrix:
        if _contiguous(rows):
            return _as_csr(self.matrix[int(rows[0]) : int(rows[-1]) + 1])
        return _as_csr(self.matrix[rows])


class H5adReader:
    """Rows of a matrix stored in an ``.h5ad`` file, read straight from the file.

    ``row_map``/``col_map`` translate the rows/columns of an AnnData view into the file's. Each
    process opens its own handle (HDF5 handles must not cross ``fork``). ``dtype`` is the matrix's
    as stored in the file. A run of consecutive rows of a CSR matrix is read as three slices of its
    ``indptr``/``indices``/``data`` datasets (an eighth of the CPU time of anndata's sparse
    dataset, which validates and copies what it reads).
    """

    def __init__(
        self,
        filename: str,
        key: str,
        row_map: np.ndarray | None,
        col_map: np.ndarray | None,
        shape: tuple[int, int],
        dtype: Any = np.float32,
    ) -> None:
        self.filename, self.key, self.row_map, self.col_map = filename, key, row_map, col_map
        self.n_rows, self.n_cols = shape
        self.dtype = np.dtype(dtype)
        self._pid: int | None = None
        self._handle: Any = None
        self._matrix: Any = None
        self._csr: tuple[Any, Any, Any] | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_pid=None, _handle=None, _matrix=None, _csr=None)
        return state

    def _open(self) -> Any:
        if self._pid != os.getpid():
            import anndata
            import h5py

            self._handle = h5py.File(self.filename, "r")
            node = self._handle[self.key]
            self._matrix = anndata.io.sparse_dataset(node) if isinstance(node, h5py.Group) else node
            self._csr = None
            if isinstance(node, h5py.Group) and node.attrs.get("encoding-type") == "csr_matrix":
                self._csr = (node["indptr"], node["indices"], node["data"])
            self._pid = os.getpid()
        return self._matrix

    def _csr_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` of the file's CSR matrix, from slices of its three datasets."""
        indptr, indices, data = self._csr
        pointers = indptr[start : stop + 1].astype(np.int64)
        lo, hi = int(pointers[0]), int(pointers[-1])
        return sp.csr_matrix((data[lo:hi], indices[lo:hi], pointers - lo), shape=(stop - start, self.n_cols))

    def read(self, rows: np.ndarray) -> sp.csr_matrix:
        matrix = self._open()
        file_rows = rows if self.row_map is None else self.row_map[rows]
        if self._csr is not None and self.col_map is None and _contiguous(file_rows):
            return _as_csr(self._csr_rows(int(file_rows[0]), int(file_rows[-1]) + 1))
        if _contiguous(file_rows):
            block = matrix[int(file_rows[0]) : int(file_rows[-1]) + 1]
        else:
            # HDF5 reads need increasing indices; read each row once, then restore the order.
            unique, inverse = np.unique(file_rows, return_inverse=True)
            block = matrix[unique]
            if len(unique) != len(file_rows) or np.any(np.diff(file_rows) < 0):
                block = block[inverse]
        if self.col_map is not None:
            block = block[:, self.col_map]
        return _as_csr(block)


def raw_as_data(adata: anndata.AnnData, who: str) -> anndata.AnnData:
    """``adata.raw`` (every gene's counts, kept there by a highly-variable-gene subset) as an
    AnnData with ``adata``'s cells, for a tokenizer whose ``layer`` is ``"raw"``."""
    import anndata as ad

    if adata.raw is None:
        raise DataError(
            f"{who}: layer 'raw' reads adata.raw, but the data has none. Keep every gene's counts "
            "there (highly_variable_genes with subset: true keeps them by default), or set layer to "
            f"one of: {', '.join(adata.layers.keys()) or 'no layers'} (null reads X)."
        )
    if adata.isbacked:
        raise DataError(f"{who}: layer 'raw' needs the data in memory (backed: false).")
    return ad.AnnData(X=adata.raw.X, obs=adata.obs, var=adata.raw.var)


def matrix_reader(adata: anndata.AnnData, layer: str | None, who: str) -> MemoryReader | H5adReader:
    """A row reader for ``adata.X`` (``layer=None``) or ``adata.layers[layer]``."""
    if layer is not None and layer not in adata.layers:
        raise DataError(
            f"{who}: layer {layer!r} is not in the data (layers: {', '.join(adata.layers.keys()) or 'none'}). "
            f"Set the tokenizer's layer parameter to one of them, or to null to read X."
        )
    key = "X" if layer is None else f"layers/{layer}"
    if adata.isbacked:
        import h5py

        with h5py.File(adata.filename, "r") as handle:
            stored = key in handle
            if stored:
                node = handle[key]
                dense = not isinstance(node, h5py.Group)
                shape = tuple(int(s) for s in (node.shape if dense else node.attrs["shape"]))
                dtype = node.dtype if dense else node["data"].dtype
        if stored:
            row_map = col_map = None
            if adata.is_view:
                # AnnData keeps a view's row/column selection of the file in _oidx/_vidx.
                row_map = np.arange(shape[0])[adata._oidx]
                col_map = np.arange(shape[1])[adata._vidx]
                if len(col_map) == shape[1] and np.array_equal(col_map, np.arange(shape[1])):
                    col_map = None
            n_rows = shape[0] if row_map is None else len(row_map)
            n_cols = shape[1] if col_map is None else len(col_map)
            return H5adReader(str(adata.filename), key, row_map, col_map, (n_rows, n_cols), dtype)
    matrix = adata.X if layer is None else adata.layers[layer]
    if matrix is None:
        raise DataError(f"{who}: the data has no X matrix. Set the tokenizer's layer parameter to a layer.")
    return MemoryReader(matrix)


# ---------------------------------------------------------------------------------------------
# Kernel results and the chunk runner
# ---------------------------------------------------------------------------------------------


@dataclass
class ChunkTokens:
    """Tokens of one row block: flat ids (and values), tokens per row, which rows to keep."""

    input_ids: np.ndarray | None
    lengths: np.ndarray
    values: np.ndarray | None = None
    keep: np.ndarray | None = None
    #: A problem found in the input: message template (with {cell} and {value}) and its row.
    problem: str | None = None
    problem_row: int = -1
    problem_value: float = 0.0
    counters: dict[str, int] | None = None
    #: Set by workers writing to disk: (ids file, values file or None) holding the tokens.
    spilled: tuple[str, str | None] | None = None

    def flag_bad_value(self, flags: int, row: int, value: float, template: str) -> None:
        """Record the first negative or non-finite value a kernel flagged.

        ``template`` may use ``{kind}`` (what was wrong) and, filled in later, ``{cell}``/``{value}``.
        """
        from grnx_plugins.tokenizers import _kernels

        if not flags:
            return
        kind = "a non-finite value" if flags & _kernels.NON_FINITE else "a negative value"
        self.problem = template.replace("{kind}", kind)
        self.problem_row, self.problem_value = int(row), float(value)


Kernel = Callable[[Any, sp.csr_matrix, dict[str, np.ndarray]], ChunkTokens]


def _drop_rows(chunk: ChunkTokens) -> ChunkTokens:
    """Remove the rows ``keep`` rejects (their tokens too); ``keep`` then marks the kept rows."""
    if chunk.keep is None or chunk.keep.all() or chunk.problem is not None:
        return chunk
    token_mask = np.repeat(chunk.keep, chunk.lengths)
    chunk.input_ids = chunk.input_ids[token_mask]
    chunk.values = None if chunk.values is None else chunk.values[token_mask]
    chunk.lengths = chunk.lengths[chunk.keep]
    return chunk


_WORKER_STATE: tuple[Kernel, Any, Any, str | None] | None = None


def _init_worker(state: tuple[Kernel, Any, Any, str | None]) -> None:
    global _WORKER_STATE
    _WORKER_STATE = state


def _run_task(rows: np.ndarray, per_row: dict[str, np.ndarray], tag: int) -> ChunkTokens:
    kernel, plan, reader, spill_dir = _WORKER_STATE
    chunk = _drop_rows(kernel(plan, reader.read(rows), per_row))
    if spill_dir is not None and chunk.problem is None:
        # Hand the tokens over through a file, not the result pipe: the main process then only
        # appends files (copy_file_range), instead of unpickling and writing every token.
        ids_file = os.path.join(spill_dir, f"{tag}.ids")
        chunk.input_ids.astype(np.int32, copy=False).tofile(ids_file)
        values_file = None
        if chunk.values is not None:
            values_file = os.path.join(spill_dir, f"{tag}.values")
            chunk.values.astype(np.float32, copy=False).tofile(values_file)
        chunk.input_ids, chunk.values, chunk.spilled = None, None, (ids_file, values_file)
    return chunk


def run_chunks(
    kernel: Kernel,
    plan: Any,
    reader: Any,
    positions: np.ndarray,
    per_row: dict[str, np.ndarray],
    chunk_size: int,
    n_workers: int,
    spill_dir: str | None = None,
) -> Iterator[tuple[np.ndarray, ChunkTokens]]:
    """Yield ``(rows, tokens)`` per chunk of ``positions``, in order, from ``n_workers`` processes.

    ``per_row`` arrays are aligned with ``positions`` and sliced per chunk. Rows the kernel does
    not keep are already removed (``tokens.keep`` tells which of ``rows`` remain). At most two
    chunks per worker are in flight, so memory stays bounded by the chunk size. With
    ``spill_dir``, workers leave the tokens in files there (see :class:`ChunkTokens`).
    """
    starts = range(0, len(positions), chunk_size)

    def task(start: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        stop = start + chunk_size
        return positions[start:stop], {name: values[start:stop] for name, values in per_row.items()}

    if n_workers <= 1 or len(positions) <= chunk_size:
        for start in starts:
            rows, extra = task(start)
            yield rows, _drop_rows(kernel(plan, reader.read(rows), extra))
        return
    methods = multiprocessing.get_all_start_methods()
    # fork shares the (possibly large in-memory) matrix without copying it; spawn pickles it once.
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(
        max_workers=n_workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=((kernel, plan, reader, spill_dir),),
    ) as pool:
        pending: collections.deque = collections.deque()
        for start in starts:
            rows, extra = task(start)
            pending.append((rows, pool.submit(_run_task, rows, extra, start)))
            if len(pending) >= 2 * n_workers:
                done_rows, future = pending.popleft()
                yield done_rows, future.result()
        while pending:
            done_rows, future = pending.popleft()
            yield done_rows, future.result()


# ---------------------------------------------------------------------------------------------
# Output sinks
# ---------------------------------------------------------------------------------------------

_NPY_HEADER_BYTES = 128


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    """A version 1.0 ``.npy`` header of fixed size, so it can be rewritten once the length is known."""
    descr = np.lib.format.dtype_to_descr(dtype)
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': ({length},), }}"
    room = _NPY_HEADER_BYTES - 10
    text = text.ljust(room - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + room.to_bytes(2, "little") + text.encode("latin1")


class _NpyAppender:
    def __init__(self, path: Path, dtype: Any) -> None:
        self.dtype = np.dtype(dtype)
        self.length = 0
        self.handle = open(path, "wb")  # noqa: SIM115 - closed in finish()
        self.handle.write(_npy_header(self.dtype, 0))

    def append(self, array: np.ndarray) -> None:
        self.handle.write(memoryview(np.ascontiguousarray(array, dtype=self.dtype)).cast("B"))
        self.length += len(array)

    def append_file(self, path: str) -> None:
        """Append a raw file of this dtype (then delete it), copied inside the kernel when possible."""
        self.handle.flush()
        size = os.path.getsize(path)
        with open(path, "rb") as source:
            copied = 0
            if hasattr(os, "copy_file_range"):
                try:
                    while copied < size:
                        step = os.copy_file_range(source.fileno(), self.handle.fileno(), size - copied)
                        if step == 0:
                            break
                        copied += step
                except OSError:
                    copied = 0
                    self.handle.seek(0, os.SEEK_END)
            if copied < size:
                source.seek(copied)
                self.handle.seek(0, os.SEEK_END)
                shutil.copyfileobj(source, self.handle)
        self.handle.seek(0, os.SEEK_END)
        os.unlink(path)
        self.length += size // self.dtype.itemsize

    def finish(self) -> None:
        self.handle.seek(0)
        self.handle.write(_npy_header(self.dtype, self.length))
        self.handle.close()


class TokenSink:
    """Collects chunk results in memory, or streams them into a TokenizedCells folder."""

    def __init__(self, folder: Path | None, with_values: bool) -> None:
        self.folder = folder
        self.with_values = with_values
        self.lengths: list[np.ndarray] = []
        if folder is None:
            self.ids: list[np.ndarray] = []
            self.values: list[np.ndarray] = []
        else:
            self.ids_file = _NpyAppender(folder / "input_ids.npy", np.int32)
            self.values_file = _NpyAppender(folder / "values.npy", np.float32) if with_values else None

    def add(
        self,
        ids: np.ndarray,
        values: np.ndarray | None,
        lengths: np.ndarray,
        spilled: tuple[str, str | None] | None = None,
    ) -> None:
        self.lengths.append(np.asarray(lengths, dtype=np.int64))
        if spilled is not None:
            self.ids_file.append_file(spilled[0])
            if self.values_file is not None:
                self.values_file.append_file(spilled[1])
        elif self.folder is None:
            self.ids.append(np.asarray(ids, dtype=np.int32))
            if self.with_values:
                self.values.append(np.asarray(values, dtype=np.float32))
        else:
            self.ids_file.append(ids)
            if self.values_file is not None:
                self.values_file.append(values)

    def finish(
        self, obs: pd.DataFrame, vocabulary: list[str], metadata: dict[str, Any]
    ) -> TokenizedCells | np.ndarray:
        """The tokens in memory, or (a folder sink) the files written and the offsets returned."""
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        if self.folder is None:
            ids = np.concatenate(self.ids) if self.ids else np.zeros(0, dtype=np.int32)
            values = None
            if self.with_values:
                values = np.concatenate(self.values) if self.values else np.zeros(0, dtype=np.float32)
            return TokenizedCells(
                input_ids=ids,
                offsets=offsets,
                obs=obs,
                values=values,
                vocabulary=vocabulary,
                metadata=metadata,
            )
        # The same files as TokenizedCells.save writes.
        self.ids_file.finish()
        if self.values_file is not None:
            self.values_file.finish()
        np.save(self.folder / "offsets.npy", offsets)
        obs.to_parquet(self.folder / "obs.parquet")
        _release_arrow_memory()
        (self.folder / "meta.json").write_text(
            json.dumps({"vocabulary": vocabulary, "metadata": metadata}), encoding="utf-8"
        )
        return offsets

    def abort(self) -> None:
        if self.folder is not None:
            for handle in (self.ids_file, self.values_file):
                if handle is not None and not handle.handle.closed:
                    handle.handle.close()


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def carried_obs(
    adata: anndata.AnnData, positions: np.ndarray, obs_columns: list[str] | None, who: str
) -> pd.DataFrame:
    """The chosen obs columns of the kept cells, indexed by cell name."""
    obs_columns = list(obs_columns or [])
    missing = [c for c in obs_columns if c not in adata.obs.columns]
    if missing:
        raise DataError(
            f"{who}: obs column(s) {', '.join(map(repr, missing))} to carry into the tokens are not in the "
            f"data. Available: {', '.join(map(str, adata.obs.columns[:30])) or 'none'}."
        )
    return adata.obs.iloc[positions][obs_columns].copy()


def tokenize_rows(
    adata: anndata.AnnData,
    *,
    who: str,
    kernel: Kernel,
    plan: Any,
    reader: Any,
    positions: np.ndarray,
    per_row: dict[str, np.ndarray],
    chunk_size: int,
    n_workers: int,
    with_values: bool,
    obs_columns: list[str] | None,
    vocabulary: list[str],
    metadata: dict[str, Any],
    path: str | Path | None = None,
) -> TokenizedCells:
    """Run ``kernel`` over ``positions`` (rows of ``adata``) and gather the tokens.

    With ``path``, the tokens are streamed into that folder (written atomically, the layout of
    :meth:`TokenizedCells.save`) and returned memory-mapped; otherwise they are kept in memory.
    ``metadata`` gains ``n_cells`` and the kernels' counters.
    """
    # Check the carried columns before any work is done.
    carried_obs(adata, positions[:0], obs_columns, who)
    counters: dict[str, int] = collections.Counter()
    kept_rows: list[np.ndarray] = []

    def consume(sink: TokenSink, spill_dir: str | None = None) -> None:
        chunks = run_chunks(kernel, plan, reader, positions, per_row, chunk_size, n_workers, spill_dir)
        with progress(total=len(positions), desc=f"{who}: tokenise", unit="cell") as bar:
            for rows, chunk in chunks:
                if chunk.problem is not None:
                    cell = adata.obs_names[rows[chunk.problem_row]]
                    raise DataError(chunk.problem.format(cell=cell, value=chunk.problem_value))
                for name, count in (chunk.counters or {}).items():
                    counters[name] += int(count)
                kept_rows.append(rows if chunk.keep is None else rows[chunk.keep])
                sink.add(chunk.input_ids, chunk.values, chunk.lengths, chunk.spilled)
                bar.update(len(rows))

    def finish(sink: TokenSink) -> tuple[Any, pd.DataFrame, dict[str, Any]]:
        kept = np.concatenate(kept_rows) if kept_rows else np.zeros(0, dtype=np.int64)
        obs = carried_obs(adata, kept, obs_columns, who)
        meta = {**metadata, **{k: int(v) for k, v in counters.items()}, "n_cells": int(len(kept))}
        return sink.finish(obs, vocabulary, meta), obs, meta

    if path is None:
        sink = TokenSink(None, with_values)
        consume(sink)
        return finish(sink)[0]
    path = Path(path)
    with atomic_path(path, directory=True) as folder:
        sink = TokenSink(folder, with_values)
        spill = folder / "chunks"
        spill.mkdir()
        try:
            consume(sink, str(spill))
            spill.rmdir()
            offsets, obs, meta = finish(sink)
        except BaseException:
            sink.abort()
            raise
    # Built from what is in memory, the ids memory-mapped, rather than loaded back: reading
    # obs.parquet again would cost memory in proportion to the cells.
    values = path / "values.npy"
    return TokenizedCells(
        input_ids=np.load(path / "input_ids.npy", mmap_mode="r", allow_pickle=False),
        offsets=offsets,
        obs=obs,
        values=np.load(values, mmap_mode="r", allow_pickle=False) if values.exists() else None,
        vocabulary=vocabulary,
        metadata=meta,
    )


def _release_arrow_memory() -> None:
    """Hand the memory Arrow's allocator keeps after a parquet write back to the system: it grows
    with the rows written, and would otherwise stay part of the process's peak."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def cell_seeds(names: pd.Index, seed: int) -> np.ndarray:
    """A 64-bit seed per cell from its name and ``seed``: a cell's random choices do not depend on
    which other cells are tokenised with it, nor on the chunking."""
    out = np.empty(len(names), dtype=np.uint64)
    salt = int(seed).to_bytes(8, "little", signed=True)
    for i, name in enumerate(map(str, names)):
        out[i] = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8, key=salt).digest(), "little")
    return out
