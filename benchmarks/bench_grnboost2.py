"""GRNBoost2 (and GENIE3) speed and memory with 1 and 2 workers, against arboreto's per-target loop.

Simulates log-normalised expression with the ``synthetic`` source (G genes x N cells, 10% of the
genes regulators), saves it once as ``.npy`` in the temp folder, and runs each measurement in its
own subprocess:

* ``arboreto``: ``arboreto.core.infer_partial_network`` called target after target in one process
  (what arboreto's Dask driver runs per target), the reference;
* ``grnx, 1 worker``: grnx's per-target regressions in-process (``execution.num_workers: 1``);
* ``grnx, 2 workers``: the same over a local Ray with 2 CPUs (Ray's start-up timed apart).

By default a sample of ``--targets`` targets (evenly spaced over the genes) is fitted against every
other gene, through the extractor's regression driver (``run_regressions``, the code ``extract``
runs), and the whole-extractor time is extrapolated from the seconds per target; ``--targets 0``
fits every target through ``GRNBoost2Extractor.extract`` instead. Figures: wall seconds, CPU
seconds of the whole process tree (driver and Ray workers), peak memory (PSS summed over the
tree, sampled every 0.2 s, and the driver's ``ru_maxrss``), and ratios from the same run.

    python benchmarks/bench_grnboost2.py                    # 2,000 genes x 5,000 cells, 16 targets
    python benchmarks/bench_grnboost2.py --quick            # 200 genes x 1,000 cells, every target
    python benchmarks/bench_grnboost2.py --method genie3 --quick

Measured 2026-12-02 (default: 2,000 genes x 5,000 cells, 16 targets, every gene a candidate
regulator), on the 2-core machine shared with other jobs (load average 4 to 7, so 2 workers had
no free second core):

    run                                  wall s  CPU s  s/target  peak MiB (tree PSS)  links  vs arboreto
    arboreto infer_partial_network loop    85.6   51.4     5.35        277              1879   1.00x
    grnx, 1 worker                         94.0   46.7     5.87        299              1879   0.91x
    grnx, 2 workers (Ray, start 9.2 s)     90.8   55.8     5.68      1,169              1879   0.94x

The same 1,879 links as arboreto. Every target (2,000), extrapolated from s/target: arboreto
178 min, grnx 196 min with 1 worker, 189 min with 2; 2 workers gave 1.03x over 1 here because the
second core was taken, and cost ~870 MiB more (the Ray worker processes and object store).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def write_expression(path: Path, n_genes: int, n_cells: int) -> None:
    """Log-normalised synthetic expression (cells x genes, float32) from the 'synthetic' source."""
    from grnx_plugins.data.synthetic import Synthetic

    source = Synthetic(n_cells=n_cells, n_genes=n_genes, n_regulators=max(2, n_genes // 10), seed=0)
    counts = source.load().layers["counts"].toarray().astype(np.float64)
    depth = np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    np.save(path, np.log1p(counts / depth * 1e4).astype(np.float32))


class TreeMemory:
    """Samples the PSS of this process and its descendants (Ray's workers) in a background thread."""

    def __init__(self, every: float = 0.2) -> None:
        import psutil

        self.root, self.every, self.peak_mb = psutil.Process(), every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def processes(self) -> list:
        return [self.root, *self.root.children(recursive=True)]

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0.0
            for process in self.processes():
                try:
                    total += process.memory_full_info().pss / 2**20
                except Exception:  # a process that ended between listing and reading
                    pass
            self.peak_mb = max(self.peak_mb, total)
            time.sleep(self.every)

    def tree_cpu_seconds(self) -> float:
        total = 0.0
        for process in self.processes():
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except Exception:
                pass
        return total

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


def measure(args: argparse.Namespace) -> dict:
    """One measurement (run in its own subprocess): ``args.mode`` on the saved expression."""
    from grnx_plugins.extractors._tree_regressions import (
        arboreto_profile,
        run_regressions,
        target_seed,
    )

    expression = np.load(args.data)
    n_genes = expression.shape[1]
    genes = [f"G{i}" for i in range(n_genes)]
    targets = (
        np.arange(n_genes)
        if args.targets == 0
        else np.unique(np.linspace(0, n_genes - 1, args.targets).round().astype(np.int64))
    )
    seeds = np.array([target_seed(0, genes[t]) for t in targets], dtype=np.int64)
    regressor = arboreto_profile(args.method, args.n_estimators, early_stop_window=25)
    result: dict = {"mode": args.mode, "targets": len(targets)}
    with TreeMemory() as memory:
        if args.mode == "arboreto":
            from arboreto.core import infer_partial_network

            wall, cpu = time.perf_counter(), time.process_time()
            frames = [
                infer_partial_network(
                    regressor.regressor_type,
                    regressor.kwargs,
                    expression,
                    genes,
                    genes[t],
                    expression[:, t],
                    early_stop_window_length=25,
                    seed=int(seed),
                )
                for t, seed in zip(targets, seeds, strict=True)
            ]
            result["links"] = int(sum(len(frame) for frame in frames))
        else:
            workers = int(args.mode)
            if workers > 1:
                import ray

                started = time.perf_counter()
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
                result["ray_start_s"] = time.perf_counter() - started
            wall, cpu = time.perf_counter(), memory.tree_cpu_seconds()
            if args.targets == 0:
                import anndata
                import pandas as pd

                from grnx_core import RunContext
                from grnx_core.recipe import ExecutionSettings
                from grnx_plugins.extractors.genie3 import GENIE3Extractor
                from grnx_plugins.extractors.grnboost2 import GRNBoost2Extractor

                adata = anndata.AnnData(X=expression, var=pd.DataFrame(index=genes))
                cls = GRNBoost2Extractor if args.method == "grnboost2" else GENIE3Extractor
                context = RunContext(adata=adata, execution=ExecutionSettings(num_workers=workers))
                interactions = cls(seed=0, n_estimators=args.n_estimators).extract(context)
                result["links"] = len(interactions)
            else:
                importances, _, _ = run_regressions(
                    regressor,
                    expression,
                    np.arange(n_genes),
                    targets,
                    seeds,
                    num_workers=workers,
                    ray_address=None,
                )
                result["links"] = int((importances > 0).sum())
        result["wall_s"] = time.perf_counter() - wall
        result["cpu_s"] = (
            time.process_time() - cpu if args.mode == "arboreto" else memory.tree_cpu_seconds() - cpu
        )
    result["peak_tree_mb"] = memory.peak_mb
    result["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--cells", type=int, default=5000)
    parser.add_argument("--targets", type=int, default=16, help="targets to fit (evenly spaced); 0: all")
    parser.add_argument("--method", choices=["grnboost2", "genie3"], default="grnboost2")
    parser.add_argument(
        "--n-estimators", type=int, default=None, help="trees per target; arboreto's when None"
    )
    parser.add_argument("--modes", nargs="+", default=["arboreto", "1", "2"])
    parser.add_argument("--quick", action="store_true", help="200 genes x 1,000 cells, every target")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode is not None:
        print(json.dumps(measure(args)))
        return
    if args.quick:
        args.genes, args.cells, args.targets = 200, 1000, 0
    data = Path(tempfile.gettempdir()) / f"grnx_bench_grnboost2_{args.genes}x{args.cells}.npy"
    if not data.exists():
        started = time.perf_counter()
        write_expression(data, args.genes, args.cells)
        print(f"wrote {data} in {time.perf_counter() - started:.0f} s")
    n_targets = args.genes if args.targets == 0 else args.targets
    print(
        f"{args.method}: {args.genes} genes x {args.cells} cells, {n_targets} targets, every gene a "
        f"candidate regulator; n_estimators {args.n_estimators or 'arboreto default'}"
    )
    rows = {}
    for mode in args.modes:
        command = [sys.executable, __file__, "--mode", mode, "--data", str(data), "--method", args.method]
        command += ["--targets", str(args.targets)]
        if args.n_estimators is not None:
            command += ["--n-estimators", str(args.n_estimators)]
        finished = subprocess.run(command, capture_output=True, text=True, check=False)
        if finished.returncode != 0:
            print(f"{mode}: failed\n{finished.stderr[-2000:]}")
            continue
        rows[mode] = json.loads(finished.stdout.strip().splitlines()[-1])
    reference = rows.get("arboreto")
    print(
        "\n| run | wall s | CPU s | s/target (wall) | peak MiB (tree PSS) | ru_maxrss MiB | links | wall vs arboreto |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, row in rows.items():
        label = "arboreto infer_partial_network loop" if mode == "arboreto" else f"grnx, {mode} worker(s)"
        ratio = f"{reference['wall_s'] / row['wall_s']:.2f}x" if reference else ""
        print(
            f"| {label} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | {row['wall_s'] / row['targets']:.3f} | "
            f"{row['peak_tree_mb']:.0f} | {row['maxrss_mb']:.0f} | {row['links']} | {ratio} |"
        )
    for mode, row in rows.items():
        if "ray_start_s" in row:
            print(f"Ray start ({mode} CPUs), not in the times above: {row['ray_start_s']:.1f} s")
    if "1" in rows and "2" in rows:
        print(f"2 workers vs 1: {rows['1']['wall_s'] / rows['2']['wall_s']:.2f}x wall")
    if args.targets != 0:
        per_target = {mode: row["wall_s"] / row["targets"] for mode, row in rows.items()}
        estimate = ", ".join(
            f"{mode}: {seconds * args.genes / 60:.0f} min" for mode, seconds in per_target.items()
        )
        print(f"every target ({args.genes}), extrapolated from s/target: {estimate}")


if __name__ == "__main__":
    main()
