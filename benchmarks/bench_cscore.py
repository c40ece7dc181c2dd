"""CS-CORE (the ``cscore`` extractor): time and memory on simulated counts, next to the published figures.

Reference: the CS-CORE Python package's own time and memory notebook
(github.com/ChangSuBiostats/CS-CORE_python, ``analysis/time_and_memory_usage.ipynb``) times
``CSCORE(adata, top 5000 genes)`` on the Wilk et al. COVID PBMC data (26,361 genes): 1,994 healthy
B cells x 5,000 genes in 0.22 min with a tracemalloc peak of 2.3 GB, and all 44,721 cells x 5,000
genes in 3.7 min with 17.2 GB (its machine is not stated). The data is not bundled, so grnx runs
on simulated counts of the same shapes (CSR float32 of ``--genes`` genes plus one gene holding the
rest of each cell's depth, ~3,000 UMIs per cell, log-normal expression with a few shared factors,
so co-expression, negative variance estimates and out-of-range correlations all occur).

Each measurement runs in its own subprocess, so ``ru_maxrss`` is its own. Columns: wall and CPU
seconds of the call; peak resident memory of the process (ru_maxrss) and the resident memory
before the call (the simulated counts, the interpreter); the tracemalloc peak during the call, as
the reference measured it. ``estimator`` is the moment fit and the p x p correlation, statistic and
p-value matrices (what the reference's ``CSCORE`` returns); ``extract`` is the whole extractor
(depth check, universe, ranked table of every pair).

    python benchmarks/bench_cscore.py --quick       # 1,994 x 5,000 and 100,000 x 500: a few minutes
    python benchmarks/bench_cscore.py               # also 44,721 x 5,000 and the 100,000 x 5,000 memory check
    python benchmarks/bench_cscore.py --settings 100000x5000 --max-memory-gb 4

Measured 2026-12-01 on the 2-core development machine, heavily shared (load average 6 to 14, so
wall time was 3 to 5 times CPU time), max_memory_gb 4, density ~0.37:

    cells x genes   mode        wall s  CPU s  peak MiB  traced MiB   published (wall, tracemalloc)
    1,994 x 5,000   estimator     83.8   16.7     1,636       1,550   13 s, 2.3 GB
    1,994 x 5,000   extract      110.8   31.6     3,098       2,813   (12,497,500 ranked pairs)
    44,721 x 1,000  estimator     61.7   25.2     2,684       2,307
    100,000 x 500   estimator     67.5   27.3     2,754       2,338
    100,000 x 1,000 estimator    321.3   92.1     4,414       3,787
    100,000 x 1,000 extract      356.2   96.3     4,246       3,507
    44,721 x 5,000  estimator    706     365       5,632           -     222 s, 17.2 GB
    100,000 x 5,000 estimator  1,431.9  938.1     7,891       6,190    (target: within 16 GB)

The last two rows were measured apart (2026-12-01 and 2026-12-02, same machine, load 4 to 7):
44,721 x 5,000 peaks at 5.5 GiB resident against the published 17.2 GB tracemalloc peak (its traced
peak was not recorded), 365 CPU s against the published 222 s wall on an unstated machine, so grnx
is not faster in CPU time there; 100,000 x 5,000 peaks at 7.7 GiB resident (6.0 GiB traced, input
1.7 GiB), within the 16 GB target, in 938 CPU s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

#: (cells, genes) -> (minutes, GB) published in the CS-CORE Python notebook cited above
PUBLISHED = {(1994, 5000): (0.22, 2.3), (44721, 5000): (3.7, 17.2)}
#: 5,000 genes x 100,000 cells must fit in this (grnx issue 13)
MEMORY_TARGET_GB = 16.0


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def simulate_counts(n_cells: int, n_genes: int, seed: int = 0):
    """CSR float32 counts (n_cells x (n_genes + 1)): Poisson(s z), z log-normal with 5 shared factors."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    log_mean = rng.normal(-9.0, 1.0, n_genes)  # mean UMIs per cell from ~0.01 to ~3 at s ~ 3,000
    loadings = rng.normal(0.0, 0.25, (n_genes, 5)) * (rng.random((n_genes, 1)) < 0.3)
    chunks = []
    for start in range(0, n_cells, 5000):
        rows = min(5000, n_cells - start)
        log_z = log_mean + rng.normal(size=(rows, 5)) @ loadings.T + rng.normal(0.0, 0.4, (rows, n_genes))
        depth = np.round(np.exp(rng.normal(8.0, 0.5, rows)))
        counts = rng.poisson(depth[:, None] * np.exp(log_z)).astype(np.float32)
        rest = np.maximum(depth - counts.sum(axis=1), 0).astype(np.float32)
        chunks.append(sp.csr_matrix(np.column_stack([counts, rest])))
    return sp.vstack(chunks, format="csr")


def worker(mode: str, n_cells: int, n_genes: int, max_memory_gb: float) -> dict:
    import anndata as ad
    import pandas as pd

    from grnx_core import RunContext
    from grnx_plugins.extractors._cscore_irls import fit_coexpression
    from grnx_plugins.extractors.cscore import CscoreExtractor

    counts = simulate_counts(n_cells, n_genes)
    genes = [f"g{j}" for j in range(n_genes)] + ["rest"]
    adata = ad.AnnData(X=counts, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]))
    adata.var_names = genes
    density = counts[:, :n_genes].nnz / (n_cells * n_genes)
    input_mb = _rss_mb()
    tracemalloc.start()
    wall, cpu = time.perf_counter(), time.process_time()
    if mode == "estimator":
        depth = np.asarray(counts.sum(axis=1)).ravel()
        fit = fit_coexpression(counts[:, :n_genes], depth, max_memory_bytes=max_memory_gb * 2**30)
        pvalue = fit.pvalue
        facts = {
            "iterations": fit.moments.n_iterations,
            "negative_variance": fit.n_negative_variance,
            "clipped": fit.n_clipped_high + fit.n_clipped_low,
            "nan_pvalues": int(np.isnan(pvalue).sum()),
        }
    else:
        extractor = CscoreExtractor(genes=genes[:n_genes], max_memory_gb=max_memory_gb)
        interactions = extractor.extract(RunContext(adata=adata))
        facts = {"pairs": len(interactions), "iterations": interactions.metadata["irls_iterations"]}
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "mode": mode,
        "cells": n_cells,
        "genes": n_genes,
        "density": density,
        "wall_s": wall,
        "cpu_s": cpu,
        "input_mb": input_mb,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "traced_peak_mb": traced_peak / 2**20,
        **facts,
    }


def run_worker(mode: str, n_cells: int, n_genes: int, max_memory_gb: float) -> dict:
    command = [sys.executable, __file__, "--worker", mode, str(n_cells), str(n_genes), str(max_memory_gb)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"worker {mode} {n_cells}x{n_genes} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        mode, n_cells, n_genes, max_memory_gb = sys.argv[2:6]
        print(json.dumps(worker(mode, int(n_cells), int(n_genes), float(max_memory_gb))))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["1994x5000", "44721x5000", "100000x5000"],
        help="CELLSxGENES settings to run",
    )
    parser.add_argument(
        "--modes", nargs="+", default=["estimator", "extract"], choices=["estimator", "extract"]
    )
    parser.add_argument("--max-memory-gb", type=float, default=4.0, help="the extractor's max_memory_gb")
    parser.add_argument("--quick", action="store_true", help="1,994 x 5,000 and 100,000 x 500")
    args = parser.parse_args()
    if args.quick:
        args.settings = ["1994x5000", "100000x500"]
    print(
        f"CPU cores: {os.cpu_count()}; BLAS threads: {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}; "
        f"max_memory_gb: {args.max_memory_gb}"
    )
    header = (
        f"{'cells x genes':>15} {'mode':>9} {'wall s':>8} {'CPU s':>8} {'input MiB':>10} {'peak MiB':>9} "
        f"{'traced MiB':>11} {'published':>17} {'time ratio':>11} {'memory ratio':>13}  notes"
    )
    print(header)
    for setting in args.settings:
        n_cells, n_genes = (int(part) for part in setting.split("x"))
        for mode in args.modes:
            result = run_worker(mode, n_cells, n_genes, args.max_memory_gb)
            published = PUBLISHED.get((n_cells, n_genes))
            if published is not None:
                minutes, gigabytes = published
                reference = f"{minutes * 60:.0f} s, {gigabytes:.1f} GB"
                time_ratio = f"{minutes * 60 / result['wall_s']:.2f}x"
                # the reference's figure is a tracemalloc peak (GB as 2**30 bytes in the notebook)
                memory_ratio = f"{gigabytes * 1024 / result['traced_peak_mb']:.2f}x"
            else:
                reference, time_ratio, memory_ratio = "-", "-", "-"
            notes = ", ".join(
                f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"
                for key, value in result.items()
                if key
                not in {"mode", "cells", "genes", "wall_s", "cpu_s", "input_mb", "peak_mb", "traced_peak_mb"}
            )
            if n_genes == 5000 and n_cells >= 100_000:
                fits = result["peak_mb"] / 1024 <= MEMORY_TARGET_GB
                notes += f"; peak within {MEMORY_TARGET_GB:.0f} GB: {'yes' if fits else 'NO'}"
            print(
                f"{setting:>15} {mode:>9} {result['wall_s']:>8.1f} {result['cpu_s']:>8.1f} "
                f"{result['input_mb']:>10.0f} {result['peak_mb']:>9.0f} {result['traced_peak_mb']:>11.0f} "
                f"{reference:>17} {time_ratio:>11} {memory_ratio:>13}  {notes}",
                flush=True,
            )
    print(
        "time ratio = published minutes / grnx wall time (above 1: grnx faster, on a different machine); "
        "memory ratio = published tracemalloc peak / grnx tracemalloc peak."
    )


if __name__ == "__main__":
    main()
