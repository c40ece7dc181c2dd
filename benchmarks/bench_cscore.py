"""CS-CORE (the ``cscore`` extractor): time and memory on simulated counts, next to the package.

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

Same-machine comparison: with ``CSCORE_SRC`` naming the folder that holds the package's ``CSCORE``
folder (a clone of CS-CORE_python; never copy or commit it here), the package's ``CSCORE`` runs on
the same simulated data in its own subprocess, then grnx's estimator, and the script prints both,
the ratios grnx / package from that run, and the largest |difference| of the correlations,
p-values and statistics over the pairs j < k where both are finite. The package is called as its
notebook does, ``CSCORE(adata, gene_index)`` with ``adata.raw`` the counts (all columns, so its
depth is over every gene), at its own settings (IRLS while delta > 0.05 and j <= 10,
``post_process=True``, p-values ``2 * (1 - cdf)``), with one change by default: ``seq_depth`` is
passed as the float64 row sums grnx uses (``--reference-depth float64``). The package's default
depth is the row sums of ``adata.raw.X`` in its dtype; on float32 counts ``mu = X.T.dot(depth)``
is then float32 and so is its whole computation (``--reference-depth package``: twice as fast, the
correlations off by up to 2e-3). Its traced peak in float64, 2,335 MiB at 1,994 x 5,000, matches
the notebook's 2.32 GiB, so the published run was in float64. numpy 2 removed ``np.Inf``, which
the package (December 2023) still uses: the worker sets it to ``np.inf`` before importing it.

    python benchmarks/bench_cscore.py --quick       # 1,994 x 5,000 and 100,000 x 500: a few minutes
    python benchmarks/bench_cscore.py               # also 44,721 x 5,000 and the 100,000 x 5,000 memory check
    python benchmarks/bench_cscore.py --settings 100000x5000 --max-memory-gb 4
    CSCORE_SRC=~/src/CS-CORE_python python benchmarks/bench_cscore.py --head-to-head 1994x5000 44721x1000

Measured 2026-12-02 on the 2-core development machine, shared (load average 4 to 5 throughout, so
wall time was up to 1.5 times CPU time), max_memory_gb 4, density ~0.37, CS-CORE_python at its
commit a0ff49d (2023-12-10), numpy 2.4.6 with OpenBLAS 0.3.31 (2 threads) for both:

    same machine, same data       wall s  CPU s  peak MiB  traced MiB   agreement (max |difference|)
    1,994 x 5,000   CS-CORE_python  20.6   13.8     2,654       2,335
                    grnx            10.6    7.0       971         613   rho 3.8e-12, p 8.3e-15, T 2.7e-14
                    grnx / package  0.51   0.51      0.37        0.26   (12,497,500 pairs)
    44,721 x 1,000  CS-CORE_python  23.4   16.8     3,766       3,265
                    grnx             7.1    4.8     1,607       1,198   rho 3.6e-12, p 2.4e-14, T 3.6e-13
                    grnx / package  0.30   0.29      0.43        0.37   (499,500 pairs)
    1,994 x 5,000, the package's float32 default depth:
                    CS-CORE_python  10.4    7.2     1,999       1,687
                    grnx            10.5    7.5       972         613   rho 1.7e-3, p 3.4e-6, T 1.2e-5
                    grnx / package  1.01   1.04      0.49        0.36   (the package's float32 rounding)

Both converged in the same number of IRLS updates (3 at 1,994 cells, 2 at 44,721), although the
package aliases theta_prev. 44,721 x 5,000 was not compared: the package would need ~17 GB of the
machine's 23 GiB. Before the estimator's compiled kernels and depth groups (same comparison, load
2 to 3): 1,994 x 5,000 grnx 12.8 CPU s against the package's 14.0 (0.92), traced 1,550 MiB (0.66);
44,721 x 1,000 19.7 CPU s against 16.2 (1.22), traced 2,307 MiB (0.71).

grnx alone, against the published figures (same day and load):

    cells x genes   mode        wall s  CPU s  peak MiB  traced MiB   published (wall, tracemalloc)
    1,994 x 5,000   estimator      8.0    7.7       972         613   13 s, 2.3 GB
    1,994 x 5,000   extract       25.0   18.4     3,176       2,830   (12,497,500 ranked pairs)
    44,721 x 1,000  estimator      7.1    4.8     1,607       1,198
    100,000 x 500   estimator     11.0    8.2     1,648       1,210
    100,000 x 500   extract       10.7    7.4     1,517       1,067
    44,721 x 5,000  estimator    105.9   77.3     4,454       3,494   222 s, 17.2 GB
    100,000 x 5,000 estimator    173.3  137.7     8,625       6,859   (target: within 16 GB)

44,721 x 5,000 takes 77 CPU s (365 before) against the published 222 s wall, at 3.4 GiB traced
against 17.2 GB; 100,000 x 5,000 peaks at 8.4 GiB resident (input 1.7 GiB; max_memory_gb bounds the
working blocks), within the 16 GB target, in 138 CPU s (938 before). ``extract`` at 1,994 x 5,000
spends ~10 s and ~2 GB beyond the estimator in building and sorting the table of 12.5 million
ranked pairs (``Interactions``). The estimator's numba kernels compile once per machine (and
after each change of the module): 3.3 CPU s on a fresh cache, then 0.25 s to load, which the
figures above include.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

#: (cells, genes) -> (minutes, GB) published in the CS-CORE Python notebook cited above
PUBLISHED = {(1994, 5000): (0.22, 2.3), (44721, 5000): (3.7, 17.2)}
#: 5,000 genes x 100,000 cells must fit in this (grnx issue 13)
MEMORY_TARGET_GB = 16.0
#: the reference's traced peak per n x p and per p x p float64 value, fitted to its notebook's two
#: figures (2.3 GB at 1,994 x 5,000, 17.2 GB at 44,721 x 5,000); used to skip settings it cannot fit
REFERENCE_ARRAYS_PER_CELL_GENE, REFERENCE_ARRAYS_PER_GENE_PAIR = 9.5, 6.0
#: the matrices compared between grnx and the reference (grnx name, reference name)
COMPARED = (("correlation", "est"), ("pvalue", "p_value"), ("statistic", "test_stat"))


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


def _import_reference():
    """``CSCORE`` of the CS-CORE Python package in the folder ``CSCORE_SRC`` names (never copied here)."""
    source = Path(os.environ["CSCORE_SRC"]).expanduser()
    if not (source / "CSCORE" / "CSCORE_IRLS.py").is_file():
        raise SystemExit(
            f"CSCORE_SRC={source}: no CSCORE/CSCORE_IRLS.py there; CSCORE_SRC must be the folder that "
            "holds the package's CSCORE folder (a clone of github.com/ChangSuBiostats/CS-CORE_python)."
        )
    # The package (December 2023) still uses np.Inf, which numpy 2 removed; the same value.
    if not hasattr(np, "Inf"):
        np.Inf = np.inf
    sys.path.insert(0, str(source))
    from CSCORE import CSCORE

    return CSCORE


def worker(
    mode: str,
    n_cells: int,
    n_genes: int,
    max_memory_gb: float,
    save_dir: str | None = None,
    reference_depth: str = "float64",
) -> dict:
    import anndata as ad
    import pandas as pd

    from grnx_core import RunContext
    from grnx_plugins.extractors._cscore_irls import fit_coexpression
    from grnx_plugins.extractors.cscore import CscoreExtractor

    reference = _import_reference() if mode == "reference" else None
    counts = simulate_counts(n_cells, n_genes)
    genes = [f"g{j}" for j in range(n_genes)] + ["rest"]
    adata = ad.AnnData(X=counts, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]))
    adata.var_names = genes
    if reference is not None:
        adata.raw = adata  # the package reads raw UMI counts from adata.raw.X (and depth over all of it)
    density = counts[:, :n_genes].nnz / (n_cells * n_genes)
    input_mb = _rss_mb()
    saved: dict[str, np.ndarray] = {}
    tracemalloc.start()
    wall, cpu = time.perf_counter(), time.process_time()
    if mode == "reference":
        # as the package's notebook times it: CSCORE(adata, gene_index), its own settings (IRLS
        # while delta > 0.05 and j <= 10, post_process=True). Its default depth is the row sums of
        # adata.raw.X in that matrix's dtype (float32 here), which makes its whole computation
        # float32; "float64" passes the same row sums in float64, as grnx computes them.
        seq_depth = None
        if reference_depth == "float64":
            seq_depth = np.asarray(counts.sum(axis=1, dtype=np.float64)).ravel()
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            est, p_value, test_stat = reference(adata, np.arange(n_genes), seq_depth=seq_depth)
        saved = {"est": est, "p_value": p_value, "test_stat": test_stat}
        converged = re.search(r"converged after (\d+) iterations", printed.getvalue())
        facts = {
            "iterations": int(converged.group(1)) if converged else "not converged",
            "nan_pvalues": int(np.isnan(p_value).sum()),
        }
    elif mode == "estimator":
        depth = np.asarray(counts.sum(axis=1, dtype=np.float64)).ravel()
        fit = fit_coexpression(counts[:, :n_genes], depth, max_memory_bytes=max_memory_gb * 2**30)
        pvalue = fit.pvalue
        saved = {"correlation": fit.correlation, "pvalue": pvalue, "statistic": fit.statistic}
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
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if save_dir is not None:  # after the measurement: the files are only for the agreement check
        for name, matrix in saved.items():
            np.save(Path(save_dir) / f"{mode}_{name}.npy", matrix)
    return {
        "mode": mode,
        "cells": n_cells,
        "genes": n_genes,
        "density": density,
        "wall_s": wall,
        "cpu_s": cpu,
        "input_mb": input_mb,
        "peak_mb": peak_mb,
        "traced_peak_mb": traced_peak / 2**20,
        **facts,
    }


def run_worker(
    mode: str,
    n_cells: int,
    n_genes: int,
    max_memory_gb: float,
    save_dir: str | None,
    reference_depth: str = "float64",
) -> dict:
    command = [sys.executable, __file__, "--worker", mode, str(n_cells), str(n_genes), str(max_memory_gb)]
    command += [save_dir or "-", reference_depth]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"worker {mode} {n_cells}x{n_genes} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def reference_fits(n_cells: int, n_genes: int) -> tuple[bool, float]:
    """Whether the reference's estimated peak fits in 80% of the memory available now (GiB needed)."""
    needed = 8.0 * (
        REFERENCE_ARRAYS_PER_CELL_GENE * n_cells * n_genes + REFERENCE_ARRAYS_PER_GENE_PAIR * n_genes**2
    )
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return needed <= 0.8 * int(line.split()[1]) * 1024, needed / 2**30
    return True, needed / 2**30


def agreement(save_dir: Path, n_genes: int, rows_per_chunk: int = 256) -> dict[str, dict[str, float]]:
    """Max |grnx - reference| of each compared matrix over the pairs j < k where both are finite."""
    result = {}
    for grnx_name, reference_name in COMPARED:
        ours = np.load(save_dir / f"estimator_{grnx_name}.npy", mmap_mode="r")
        theirs = np.load(save_dir / f"reference_{reference_name}.npy", mmap_mode="r")
        max_difference, max_relative, n_shared, n_one_finite = 0.0, 0.0, 0, 0
        for start in range(0, n_genes, rows_per_chunk):
            stop = min(start + rows_per_chunk, n_genes)
            upper = np.arange(n_genes)[None, :] > np.arange(start, stop)[:, None]
            a = np.asarray(ours[start:stop], dtype=np.float64)[upper]
            b = np.asarray(theirs[start:stop], dtype=np.float64)[upper]
            both = np.isfinite(a) & np.isfinite(b)
            n_shared += int(both.sum())
            n_one_finite += int((np.isfinite(a) != np.isfinite(b)).sum())
            if both.any():
                difference = np.abs(a[both] - b[both])
                max_difference = max(max_difference, float(difference.max()))
                scale = np.maximum(np.abs(b[both]), 1e-300)
                max_relative = max(max_relative, float((difference / scale).max()))
        result[grnx_name] = {
            "max_abs": max_difference,
            "max_rel": max_relative,
            "shared": n_shared,
            "one_finite": n_one_finite,
        }
    return result


def head_to_head(n_cells: int, n_genes: int, max_memory_gb: float, reference_depth: str) -> None:
    """The reference's CSCORE and grnx's estimator on the same data, each in its own subprocess."""
    setting = f"{n_cells}x{n_genes}"
    fits, needed_gb = reference_fits(n_cells, n_genes)
    if not fits:
        print(f"{setting:>15} reference: not run (needs ~{needed_gb:.1f} GiB, more than 80% of what is free)")
        return
    with tempfile.TemporaryDirectory(prefix="bench_cscore_") as save_dir:
        reference = run_worker("reference", n_cells, n_genes, max_memory_gb, save_dir, reference_depth)
        ours = run_worker("estimator", n_cells, n_genes, max_memory_gb, save_dir)
        agreed = agreement(Path(save_dir), n_genes)
    for row in (reference, ours):
        print(
            f"{setting:>15} {row['mode']:>9} {row['wall_s']:>8.1f} {row['cpu_s']:>8.1f} "
            f"{row['input_mb']:>10.0f} {row['peak_mb']:>9.0f} {row['traced_peak_mb']:>11.0f}  "
            f"iterations {row['iterations']}, NaN p-values {row['nan_pvalues']}",
            flush=True,
        )
    ratios = ", ".join(
        f"{label} {ours[key] / reference[key]:.2f}"
        for label, key in (
            ("wall", "wall_s"),
            ("CPU", "cpu_s"),
            ("peak RSS", "peak_mb"),
            ("traced peak", "traced_peak_mb"),
        )
    )
    print(f"{setting:>15} grnx / reference: {ratios}  (below 1: grnx faster or smaller)")
    for name, facts in agreed.items():
        # relative differences of p-values say nothing: the package's 2 * (1 - cdf) is 0 or ~1e-16
        # where grnx's 2 * sf goes on down to 1e-300
        relative = "" if name == "pvalue" else f" (max relative {facts['max_rel']:.3g})"
        print(
            f"{setting:>15} agreement {name}: max |difference| {facts['max_abs']:.3g}{relative} over "
            f"{facts['shared']:,} pairs j < k finite in both; finite in only one: {facts['one_finite']:,}"
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        mode, n_cells, n_genes, max_memory_gb, save_dir, reference_depth = sys.argv[2:8]
        result = worker(
            mode,
            int(n_cells),
            int(n_genes),
            float(max_memory_gb),
            None if save_dir == "-" else save_dir,
            reference_depth,
        )
        print(json.dumps(result))
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
    parser.add_argument(
        "--head-to-head",
        nargs="+",
        metavar="CELLSxGENES",
        help="with CSCORE_SRC set: run only the same-machine comparison, at these settings "
        "(without it, the comparison runs at --settings, then the usual table)",
    )
    parser.add_argument(
        "--reference-depth",
        choices=["float64", "package"],
        default="float64",
        help="depth given to the reference: the row sums in float64 (as grnx), or the package's "
        "default (row sums of adata.raw.X in its dtype, float32 here: its whole computation is float32)",
    )
    args = parser.parse_args()
    if args.quick:
        args.settings = ["1994x5000", "100000x500"]
    source = os.environ.get("CSCORE_SRC")
    if source:
        print(
            f"CS-CORE's own CSCORE (CSCORE_SRC={source}) against grnx's estimator on the same data, "
            "same machine, each in its own subprocess:"
        )
        print(
            f"{'cells x genes':>15} {'mode':>9} {'wall s':>8} {'CPU s':>8} {'input MiB':>10} {'peak MiB':>9} "
            f"{'traced MiB':>11}  notes"
        )
        for setting in args.head_to_head or args.settings:
            n_cells, n_genes = (int(part) for part in setting.split("x"))
            head_to_head(n_cells, n_genes, args.max_memory_gb, args.reference_depth)
        if args.head_to_head:
            return
        print()
    else:
        print(
            "CS-CORE's own CSCORE: not run (set CSCORE_SRC to a clone of "
            "github.com/ChangSuBiostats/CS-CORE_python for a same-machine comparison)."
        )
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
            result = run_worker(mode, n_cells, n_genes, args.max_memory_gb, None)
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
