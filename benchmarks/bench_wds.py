"""WDS sampler speed and memory on a synthetic backed h5ad, against the published implementation's rate.

Writes (once, in chunks) a backed h5ad of N synthetic cells x G genes with about NNZ non-zero counts
per cell, then runs grnx's ``wds`` sampler on it (both streaming passes) at R = 500 and R = 200 and
prints cells/s per pass, per core, peak memory and how resident memory evolved during pass 1 (it
should not grow with the number of cells read). It also times a straightforward per-cell, per-hash
loop over the 0-bit ICWS formula, written the way the published code hashes cells (tables per hash,
numpy over one cell's non-zeros, argmin), on a few hundred cells.

Reference: the published WDS code (github.com/Evan810828/ADInteractome,
``transformer/weighted_sampling_dataset.py``) hashes about 15 cells/s per core at R = 500 (figure
given in grnx issue 6); grnx's target is >= 50x that.

    python benchmarks/bench_wds.py                      # 500k cells (about 8 GB of h5ad in /tmp)
    python benchmarks/bench_wds.py --quick              # 20k cells, a minute
    python benchmarks/bench_wds.py --cells 100000 --threads 2
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def write_synthetic_h5ad(path: Path, n_cells: int, n_genes: int, nnz: int, seed: int = 0) -> None:
    """Random counts, written chunk by chunk so generating them needs no more memory than a chunk."""
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import sparse_dataset, write_elem

    rng = np.random.default_rng(seed)
    # Draw with replacement then drop repeats: n_genes (1 - exp(-draws / n_genes)) = nnz unique genes.
    draws = int(round(-n_genes * np.log1p(-min(nnz / n_genes, 0.999))))
    temporary = path.with_suffix(".partial")
    with h5py.File(temporary, "w") as handle:
        write_elem(handle, "obs", pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]))
        write_elem(handle, "var", pd.DataFrame(index=[f"gene{i}" for i in range(n_genes)]))
        matrix = None
        for start in range(0, n_cells, 10_000):
            rows = min(10_000, n_cells - start)
            genes = np.sort(rng.integers(0, n_genes, (rows, draws), dtype=np.int32), axis=1)
            keep = np.ones_like(genes, dtype=bool)
            keep[:, 1:] = genes[:, 1:] != genes[:, :-1]
            indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int64)
            values = (rng.geometric(0.4, int(indptr[-1]))).astype(np.float32)
            chunk = sp.csr_matrix((values, genes[keep], indptr), shape=(rows, n_genes))
            if matrix is None:
                write_elem(handle, "X", chunk)
                matrix = sparse_dataset(handle["X"])
            else:
                matrix.append(chunk)
    temporary.rename(path)


class ResidentMemory:
    """Samples this process's resident memory every few milliseconds in a background thread."""

    def __init__(self, every: float = 0.05) -> None:
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now_mb() -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize() / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.now_mb()))
            time.sleep(self.every)

    def __enter__(self) -> ResidentMemory:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def peak_between(self, start: float, stop: float) -> float:
        values = [mb for t, mb in self.samples if start <= t <= stop]
        return max(values) if values else float("nan")


def fix_malloc_mmap_threshold(size: int = 1 << 20) -> bool:
    """Make glibc return every block above ``size`` to the OS when freed.

    glibc raises its mmap threshold after large frees (up to 32 MiB), after which each chunk's
    arrays come from the heap and fragmentation shows up as slowly rising resident memory that has
    nothing to do with the sampler. A fixed threshold makes RSS measure the algorithm.
    """
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, size))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def naive_reference_rate(path: Path, n_hashes: int, n_cells: int, seed: int = 0) -> float:
    """Per-cell, per-hash ICWS like the published code (float64 tables per hash); pass-1 cells/s per core."""
    import anndata as ad

    backed = ad.read_h5ad(path, backed="r")
    chunk = backed.X[0:n_cells]
    n_genes = backed.n_vars
    backed.file.close()
    rng = np.random.default_rng(seed)
    ran_r = [rng.gamma(2.0, 1.0, n_genes) for _ in range(n_hashes)]
    ran_c = [rng.gamma(2.0, 1.0, n_genes) for _ in range(n_hashes)]
    ran_b = [rng.uniform(0.0, 1.0, n_genes) for _ in range(n_hashes)]
    sketch = np.zeros((n_hashes, n_genes), dtype=np.int64)
    hashes = np.zeros((n_cells, n_hashes), dtype=np.int64)
    started = time.process_time()
    for cell in range(n_cells):
        row = slice(chunk.indptr[cell], chunk.indptr[cell + 1])
        seq, weight = chunk.indices[row], chunk.data[row].astype(np.float64)
        for j in range(n_hashes):
            r, c, b = ran_r[j][seq], ran_c[j][seq], ran_b[j][seq]
            t = np.floor(np.log(weight) / r + b)
            log_a = np.log(c) - r * (t - b) - r
            hashes[cell, j] = seq[np.argmin(log_a)]
            sketch[j, hashes[cell, j]] += 1
    return n_cells / (time.process_time() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cells", type=int, default=500_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--nnz", type=int, default=2_000, help="non-zero genes per cell (about)")
    parser.add_argument("--hashes", type=int, nargs="+", default=[500, 200])
    parser.add_argument("--threads", type=int, default=1, help="numba threads (1 = per-core figures)")
    parser.add_argument("--naive-cells", type=int, default=200)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--path", type=Path, default=None, help="h5ad to reuse or create")
    parser.add_argument("--keep", action="store_true", help="keep the generated h5ad")
    parser.add_argument("--quick", action="store_true", help="20k cells, R = 200 and 500, 100 naive cells")
    parser.add_argument(
        "--default-malloc", action="store_true", help="keep glibc's dynamic mmap threshold (RSS then drifts)"
    )
    args = parser.parse_args()
    fixed_threshold = not args.default_malloc and fix_malloc_mmap_threshold()
    if args.quick:
        args.cells, args.naive_cells = 20_000, 100

    import anndata as ad
    import numba

    from grnx_plugins.samplers.wds import WeightedDiversifiedSampler

    numba.set_num_threads(args.threads)
    path = (
        args.path or Path(tempfile.gettempdir()) / f"grnx_bench_wds_{args.cells}x{args.genes}x{args.nnz}.h5ad"
    )
    created = False
    if not path.exists():
        started = time.perf_counter()
        write_synthetic_h5ad(path, args.cells, args.genes, args.nnz)
        created = True
        print(
            f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - started:.0f} s"
        )
    backed = ad.read_h5ad(path, backed="r")
    n_cells, n_genes = backed.shape
    nnz_per_cell = backed.X[0:1000].nnz / min(1000, n_cells)
    print(
        f"data: {n_cells} cells x {n_genes} genes, {nnz_per_cell:.0f} non-zeros per cell, backed h5ad; "
        f"numba threads: {args.threads}; CPU cores here: {numba.config.NUMBA_NUM_THREADS}; "
        f"glibc mmap threshold fixed at 1 MiB: {fixed_threshold}"
    )

    # Compile (or load the cached kernels) outside the timings.
    WeightedDiversifiedSampler(n_cells=10, n_hashes=8).sample(
        ad.AnnData(X=backed.X[0:50]), np.random.default_rng(0)
    )

    rows = []
    with ResidentMemory() as memory:
        baseline = ResidentMemory.now_mb()
        for n_hashes in args.hashes:
            sampler = WeightedDiversifiedSampler(fraction=0.01, n_hashes=n_hashes, chunk_size=args.chunk_size)
            started = time.perf_counter()
            sample = sampler.sample(backed, np.random.default_rng(0))
            finished = time.perf_counter()
            info = sample.info
            # The passes end just before sample() returns (drawing the sample takes milliseconds).
            pass1_start = finished - info["pass2_seconds"] - info["pass1_seconds"]
            pass1_end = pass1_start + info["pass1_seconds"]
            rows.append(
                (
                    n_hashes,
                    n_cells / info["pass1_seconds"],
                    n_cells / info["pass1_cpu_seconds"],
                    n_cells / info["pass2_seconds"],
                    n_cells / info["pass2_cpu_seconds"],
                    memory.peak_between(pass1_start, pass1_start + 0.1 * info["pass1_seconds"]),
                    memory.peak_between(pass1_start + 0.9 * info["pass1_seconds"], pass1_end),
                    memory.peak_between(started, finished),
                )
            )
    backed.file.close()

    print(f"\nresident memory before sampling: {baseline:.0f} MiB (includes obs names of {n_cells} cells)")
    header = (
        f"{'R':>4} {'pass1 cells/s':>14} {'pass1 /core':>12} {'pass2 cells/s':>14} {'pass2 /core':>12} "
        f"{'RSS 0-10% of pass1':>19} {'RSS 90-100% of pass1':>21} {'RSS peak':>9}"
    )
    print(header)
    for n_hashes, p1, p1c, p2, p2c, early, end1, peak in rows:
        print(
            f"{n_hashes:>4} {p1:>14.0f} {p1c:>12.0f} {p2:>14.0f} {p2c:>12.0f} "
            f"{early:>15.0f} MiB {end1:>17.0f} MiB {peak:>5.0f} MiB"
        )
    print(
        f"peak RSS of the process (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )

    print("\nper-core hashing rate (pass 1, CPU time) vs references:")
    published = 15.0
    for n_hashes, _, p1c, *_ in rows:
        naive_rate = naive_reference_rate(path, n_hashes, args.naive_cells)
        agreement = _agreement(path, n_hashes, min(args.naive_cells, 50))
        line = (
            f"  R={n_hashes}: grnx {p1c:,.0f} cells/s/core; naive per-cell loop {naive_rate:,.1f} cells/s/core "
            f"(x{p1c / naive_rate:,.0f}); published code ~{published:.0f} cells/s/core (x{p1c / published:,.0f})"
        )
        if n_hashes != 500:
            line += " [published figure is for R=500]"
        print(line + f"; same gene as a float64 loop on the same draws: {agreement:.4f}")

    if created and not args.keep and args.path is None:
        path.unlink()


def _agreement(path: Path, n_hashes: int, n_cells: int) -> float:
    """Share of (cell, hash) pairs where grnx's kernel and a float64 per-cell loop pick the same gene."""
    import anndata as ad

    from grnx_plugins.samplers import _wds_hashing as hashing

    backed = ad.read_h5ad(path, backed="r")
    chunk = backed.X[0:n_cells]
    n_genes = backed.n_vars
    backed.file.close()
    tables = hashing.HashTables.draw(n_genes, n_hashes, n_genes, np.random.default_rng(1))
    fast = hashing.minhash_genes(chunk, tables)
    rng = np.random.default_rng(1)
    draws = [
        (rng.gamma(2.0, 1.0, n_genes), rng.gamma(2.0, 1.0, n_genes), rng.uniform(0.0, 1.0, n_genes))
        for _ in range(n_hashes)
    ]
    same = 0
    for cell in range(n_cells):
        row = slice(chunk.indptr[cell], chunk.indptr[cell + 1])
        seq, weight = chunk.indices[row], chunk.data[row].astype(np.float64)
        for j, (r, c, b) in enumerate(draws):
            t = np.floor(np.log(weight) / r[seq] + b[seq])
            log_a = np.log(c[seq]) - r[seq] * (t - b[seq]) - r[seq]
            same += seq[np.argmin(log_a)] == fast[cell, j]
    return same / (n_cells * n_hashes)


if __name__ == "__main__":
    sys.exit(main())
