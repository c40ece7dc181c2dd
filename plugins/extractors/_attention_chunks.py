"""The attention extractor's Z and M sums over chunks of cells, as Ray tasks.

Cells are independent in ``Z[a,b] = sum_c w_c E_c[a,b]`` and ``M[a,b] = sum_c w_c``
(docs/methods/extractors.md#attention), so the cells are split into chunks, each Ray task returns its chunk's partial sums,
and the driver adds them in chunk order, in float64: the result is the in-process one up to the
order of float additions, and the same on every run with the same number of workers. Whatever
follows the sums (symmetrising, Z / M, the APC or centring correction) runs once, on the driver,
over the combined sums.

The model travels as its own ``save()`` folder (weights in safetensors or ``weights_only`` torch
files, JSON metadata), read back with the model class's ``load()``: no pickle of the fitted model
is made or read. Each worker process keeps the last model it loaded, so the chunks it runs after
the first load it once. Each task holds one CPU and runs torch on CPU with the driver's
``execution.num_threads`` / ``GRNX_NUM_THREADS`` threads (1, the CPU Ray holds for it, when unset).

When Ray is used follows grnboost2 (``_tree_regressions.run_regressions``): a Ray already started
in this process is used as it is, ``execution.ray_address`` joins that cluster, else a local Ray
with ``num_workers`` CPUs is started and stopped afterwards. Unlike grnboost2 there is no probe
when ``num_workers`` is unset: the model's forward passes already use the local CPUs through
torch's threads, so only ``num_workers > 1`` or a cluster address sends the cells to Ray.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from grnx_core import DataError, GrnxError, TokenizedCells
from grnx_core.progress import progress
from grnx_core.ray_connect import init_ray

#: Chunks per worker: a few, so a worker that got slow cells does not hold up the end for long,
#: while each chunk's (n_genes x n_genes) partial sums stay few to send back and add.
CHUNKS_PER_WORKER = 2
#: Folder name of the saved model inside the temporary folders.
MODEL_FOLDER = "model"


def uses_ray(num_workers: int | None, ray_address: str | None) -> bool:
    """Whether the cells go to Ray: a cluster address, or more than one worker asked for."""
    return bool(ray_address) or (num_workers is not None and num_workers > 1)


@dataclass(frozen=True)
class SavedModel:
    """A fitted model as the files of its ``save()`` folder, and the class whose ``load()`` reads them."""

    model_class: type
    files: dict[str, bytes]
    digest: str


def pack_model(model: Any, who: str) -> SavedModel:
    """``model.save()`` into a temporary folder, read back as bytes (relative path -> content)."""
    model_class = type(model)
    if not callable(getattr(model, "save", None)) or not callable(getattr(model_class, "load", None)):
        raise DataError(
            f"{who}: model {getattr(model, 'name', model_class.__name__)!r} has no save()/load(), so it "
            "cannot be sent to Ray workers. Set execution.num_workers: 1 (and no execution.ray_address)."
        )
    with tempfile.TemporaryDirectory(prefix="grnx-attention-model-") as temporary:
        folder = Path(temporary) / MODEL_FOLDER
        try:
            model.save(folder)
        except NotImplementedError:
            raise DataError(
                f"{who}: model {getattr(model, 'name', model_class.__name__)!r} cannot be saved, so it "
                "cannot be sent to Ray workers. Set execution.num_workers: 1 (and no execution.ray_address)."
            ) from None
        files = {
            path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        }
    digest = hashlib.sha256()
    for name, content in files.items():
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    return SavedModel(model_class, files, digest.hexdigest())


#: The model this worker process loaded last, by the digest of its files.
_loaded: dict[str, Any] = {}


def loaded_model(saved: SavedModel) -> Any:
    """The model of ``saved``, loaded with its class's ``load()`` (once per worker process)."""
    if saved.digest not in _loaded:
        with tempfile.TemporaryDirectory(prefix="grnx-attention-model-") as temporary:
            folder = Path(temporary) / MODEL_FOLDER
            for name, content in saved.files.items():
                path = folder / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
            model = saved.model_class.load(folder)
        _loaded.clear()  # one model per worker: a new run's model replaces the last
        _loaded[saved.digest] = model
    return _loaded[saved.digest]


def chunk_cells(cells: np.ndarray, lengths: np.ndarray, n_chunks: int) -> list[np.ndarray]:
    """``cells`` dealt round-robin by length into ``n_chunks`` chunks of about equal work.

    Each chunk gets cells of every length, so chunks cost alike, and inside a chunk the model
    still batches cells of similar length.
    """
    cells = np.asarray(cells, dtype=np.int64)
    by_length = cells[np.argsort(lengths[cells], kind="stable")]
    n_chunks = max(1, min(n_chunks, len(cells)))
    return [by_length[start::n_chunks] for start in range(n_chunks)]


def chunk_sums(
    extractor: Any,
    saved: SavedModel,
    tokens: TokenizedCells,
    weights: np.ndarray,
    universe: np.ndarray,
    rows: np.ndarray,
    threads: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One Ray task: (Z, M) of the chunk's cells (``tokens`` holds just them; ``rows`` are their
    rows in the run's tokens, for messages) with ``threads`` torch threads."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = loaded_model(saved)
        return extractor.aggregate(
            model, None, np.arange(tokens.n_cells), weights, universe, tokens, cell_rows=rows
        )
    finally:
        torch.set_num_threads(previous)


def sums_on_ray(
    extractor: Any,
    model: Any,
    tokens: TokenizedCells,
    groups: list[np.ndarray],
    weights: np.ndarray,
    universe: np.ndarray,
    *,
    num_workers: int | None,
    ray_address: str | None,
    threads: int | None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(Z, M) of each group of cells, its chunks computed by Ray tasks and added in chunk order.

    At most one chunk per worker is in flight (the cluster's CPUs when ``num_workers`` is None),
    so the driver holds at most that many partial sums besides the running total.
    """
    import ray

    who = f"extractor {extractor.name!r}"
    saved = pack_model(model, who)
    started_here = not ray.is_initialized()
    if started_here:
        init_ray(ray_address, num_workers, log_to_driver=False)
    try:
        workers = num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(num_cpus=1)(chunk_sums)
        shared_model = ray.put(saved)
        n_genes = len(universe)
        sums = []
        for cells in groups:
            chunks = chunk_cells(cells, tokens.lengths, CHUNKS_PER_WORKER * workers)
            z, m = np.zeros((n_genes, n_genes)), np.zeros((n_genes, n_genes))
            in_flight: deque[tuple[Any, int]] = deque()
            with progress(total=len(cells), desc=f"{who}: attention maps on Ray", unit="cell") as bar:
                for rows in chunks:
                    in_flight.append(
                        _submit(task, extractor, shared_model, tokens, weights, universe, rows, threads)
                    )
                    if len(in_flight) == workers:
                        _add_oldest(in_flight, z, m, bar)
                while in_flight:
                    _add_oldest(in_flight, z, m, bar)
            sums.append((z, m))
        return sums
    finally:
        if started_here:
            ray.shutdown()


def _submit(
    task: Any,
    extractor: Any,
    shared_model: Any,
    tokens: TokenizedCells,
    weights: np.ndarray,
    universe: np.ndarray,
    rows: np.ndarray,
    threads: int | None,
) -> tuple[Any, int]:
    reference = task.remote(
        extractor, shared_model, tokens.subset(rows), weights[rows], universe, rows, threads or 1
    )
    return reference, len(rows)


def _add_oldest(in_flight: deque, z: np.ndarray, m: np.ndarray, bar: Any) -> None:
    """Wait for the oldest chunk and add its sums: a fixed order, so a fixed float result."""
    import ray
    from ray.exceptions import RayTaskError

    reference, n_cells = in_flight.popleft()
    try:
        part_z, part_m = ray.get(reference)
    except RayTaskError as error:
        # The worker's own grnx error (NaN attention, a bad layer), without Ray's traceback.
        if isinstance(error.cause, GrnxError):
            raise error.cause from None
        raise
    z += part_z
    m += part_m
    bar.update(n_cells)
