"""NES of a ranked pair list: grnx's streamed prerank next to gseapy.prerank 1.3.1, time and peak memory.

Each measurement runs in its own subprocess so peak resident memory (ru_maxrss) is its own; the
"input" column is the resident memory once the inputs are built, before the timed call.

    python benchmarks/bench_nes.py --quick          # 20k and 100k pairs, a few seconds
    python benchmarks/bench_nes.py                  # 200k, 1M, 10M pairs x 1000 permutations
    python benchmarks/bench_nes.py --sizes 1000000 --gseapy-permutations 100

gseapy holds ~39 bytes x pairs x permutations (its Rust code keeps one tag vector per permutation),
so it runs with ``--gseapy-permutations`` (default 100) where ``pairs x permutations x 39 B`` stays
under ``--gseapy-max-gb``; its time at 1000 permutations is then extrapolated linearly (stated).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GSEAPY_BYTES_PER_ITEM_PERMUTATION = 39


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def planted_hits(n_items: int, k: int, seed: int = 0) -> np.ndarray:
    """k hit positions: 20% in the top 5% of the list, the rest uniform (a realistic weak enrichment)."""
    rng = np.random.default_rng(seed)
    top = rng.choice(max(n_items // 20, k), size=k // 5, replace=False)
    rest = rng.choice(np.setdiff1d(np.arange(n_items), top), size=k - len(top), replace=False)
    return np.sort(np.r_[top, rest])


def worker(mode: str, n_items: int, k: int, permutations: int, stream: str) -> dict:
    hits = planted_hits(n_items, k)
    if mode == "core":
        from grnx_plugins.evaluators import _gsea

        metric = np.arange(n_items - 1, -1, -1, dtype=np.float64)
        _gsea.prerank(metric[:100], np.arange(3), n_permutations=2, stream=stream)  # compile numba
        input_mb = _rss_mb()
        start = time.perf_counter()
        result = _gsea.prerank(metric, hits, n_permutations=permutations, seed=6, stream=stream)
        seconds = time.perf_counter() - start
        return {
            "seconds": seconds,
            "peak_mb": _peak_mb(),
            "input_mb": input_mb,
            "es": result.es,
            "nes": result.nes,
            "pvalue": result.pvalue,
        }
    if mode == "evaluator":
        import pandas as pd

        from grnx_core import GroundTruth, Interactions, RunContext
        from grnx_plugins.evaluators import _gsea
        from grnx_plugins.evaluators.nes import NesEvaluator

        _gsea.prerank(np.arange(100.0)[::-1], np.arange(3), n_permutations=2)  # compile numba
        n_genes = int(np.ceil((1 + np.sqrt(1 + 8 * n_items)) / 2))
        genes = np.array([f"GENE{i:05d}" for i in range(n_genes)], dtype=object)
        rows, cols = np.triu_indices(n_genes, 1)
        rows, cols = rows[:n_items], cols[:n_items]
        table = pd.DataFrame(
            {
                "source": genes[rows],
                "target": genes[cols],
                "score": np.arange(n_items, 0, -1, dtype=np.float64),
            }
        )
        del rows, cols
        interactions = Interactions(table, directed=False, extractor="bench", genes=list(genes))
        del table
        positions = hits
        edges = pd.DataFrame(
            {
                "source": interactions.table["source"].to_numpy()[positions],
                "target": interactions.table["target"].to_numpy()[positions],
            }
        )
        context = RunContext(seed=0, ground_truth=GroundTruth(edges, directed=False, name="bench"))
        context.interactions["bench"] = interactions
        evaluator = NesEvaluator(permutations=permutations, permutation_stream=stream, plot=True)
        input_mb = _rss_mb()
        start = time.perf_counter()
        metrics = evaluator.evaluate(context).metrics
        seconds = time.perf_counter() - start
        return {
            "seconds": seconds,
            "peak_mb": _peak_mb(),
            "input_mb": input_mb,
            "es": metrics["bench/es"],
            "nes": metrics["bench/nes"],
            "pvalue": metrics["bench/pvalue"],
        }
    if mode == "gseapy":
        import gseapy
        import pandas as pd

        items = pd.Index([f"P{i}|Q{i}" for i in range(n_items)])
        ranking = pd.Series(np.arange(n_items - 1, -1, -1, dtype=np.float64), index=items)
        gene_set = {"truth": list(items[hits])}
        input_mb = _rss_mb()
        start = time.perf_counter()
        result = gseapy.prerank(
            ranking,
            gene_set,
            min_size=1,
            max_size=10**9,
            permutation_num=permutations,
            seed=6,
            ascending=None,
            threads=1,
            no_plot=True,
            outdir=None,
        ).res2d
        seconds = time.perf_counter() - start
        row = result.iloc[0]
        return {
            "seconds": seconds,
            "peak_mb": _peak_mb(),
            "input_mb": input_mb,
            "es": float(row["ES"]),
            "nes": float(row["NES"]),
            "pvalue": float(row["NOM p-val"]),
        }
    raise ValueError(mode)


def measure(mode: str, n_items: int, k: int, permutations: int, stream: str = "fast") -> dict:
    command = [sys.executable, __file__, "--worker", mode, str(n_items), str(k), str(permutations), stream]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        return {"error": completed.stderr.strip().splitlines()[-1] if completed.stderr else "failed"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (20k, 100k pairs)")
    parser.add_argument("--sizes", type=int, nargs="*", default=None, help="list lengths (pairs)")
    parser.add_argument(
        "--hits", type=int, default=16_096, help="ground-truth pairs in the list (AD set: 16,096)"
    )
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--gseapy-permutations", type=int, default=100)
    parser.add_argument("--gseapy-max-gb", type=float, default=6.0, help="skip gseapy above this estimate")
    parser.add_argument(
        "--gseapy-stream-max",
        type=int,
        default=1_000_000,
        help="largest list for grnx's gseapy-compatible stream (O(n) per permutation)",
    )
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, n_items, k, permutations, stream = args.worker
        print(json.dumps(worker(mode, int(n_items), int(k), int(permutations), stream)))
        return
    sizes = args.sizes or ([20_000, 100_000] if args.quick else [200_000, 1_000_000, 10_000_000])
    perms = args.permutations
    print(
        f"NES of a ranked pair list, {perms} permutations; hits = min({args.hits}, pairs/10); "
        "time of the call; memory: resident MB (peak of the process / after building inputs)"
    )
    header = f"{'pairs':>11} {'method':<34} {'perms':>6} {'seconds':>9} {'peak MB':>9} {'input MB':>9}  {'ES':>8} {'NES':>7}"
    print(header)
    print("-" * len(header))
    for n_items in sizes:
        k = min(args.hits, n_items // 10)
        rows = {
            "grnx core (fast stream)": measure("core", n_items, k, perms, "fast"),
            "grnx nes evaluator (fast, +plot)": measure("evaluator", n_items, k, perms, "fast"),
        }
        if n_items <= args.gseapy_stream_max:
            rows["grnx core (gseapy stream)"] = measure("core", n_items, k, perms, "gseapy")
        gseapy_perms = args.gseapy_permutations
        estimate_gb = GSEAPY_BYTES_PER_ITEM_PERMUTATION * n_items * (gseapy_perms + 1) / 1e9
        if estimate_gb <= args.gseapy_max_gb:
            rows["gseapy.prerank"] = measure("gseapy", n_items, k, gseapy_perms)
            rows["grnx core (gseapy stream, same perms)"] = measure(
                "core", n_items, k, gseapy_perms, "gseapy"
            )
        else:
            rows["gseapy.prerank"] = {
                "error": f"skipped: needs ~{estimate_gb:.0f} GB at {gseapy_perms} permutations"
            }
        for name, row in rows.items():
            used = gseapy_perms if "gseapy.prerank" in name or "same perms" in name else perms
            if "error" in row:
                print(f"{n_items:>11,} {name:<34} {used:>6} {row['error']}")
                continue
            print(
                f"{n_items:>11,} {name:<34} {used:>6} {row['seconds']:>9.2f} {row['peak_mb']:>9.0f} "
                f"{row['input_mb']:>9.0f}  {row['es']:>8.4f} {row['nes']:>7.3f}"
            )
        fast, gsea = rows["grnx core (fast stream)"], rows["gseapy.prerank"]
        if "error" not in gsea and "error" not in fast:
            scaled = gsea["seconds"] * perms / gseapy_perms
            print(
                f"{'':>11} ratio gseapy/grnx-fast time at {perms} permutations: {scaled / fast['seconds']:.0f}x "
                f"(gseapy {gsea['seconds']:.2f} s at {gseapy_perms} permutations, x{perms / gseapy_perms:g} "
                f"extrapolated); memory above inputs: gseapy {gsea['peak_mb'] - gsea['input_mb']:.0f} MB at "
                f"{gseapy_perms} permutations (~{39 * n_items * (perms + 1) / 1e9:.1f} GB at {perms}) vs grnx "
                f"{fast['peak_mb'] - fast['input_mb']:.0f} MB at {perms}; ES equal: {gsea['es'] == fast['es']}"
            )
            same = rows.get("grnx core (gseapy stream, same perms)", {})
            if "error" not in same and same:
                print(
                    f"{'':>11} gseapy-compatible stream at {gseapy_perms} permutations: NES equal to gseapy: "
                    f"{same['nes'] == gsea['nes']}, p equal: {same['pvalue'] == gsea['pvalue']}; time ratio "
                    f"gseapy/grnx {gsea['seconds'] / same['seconds']:.1f}x"
                )


if __name__ == "__main__":
    main()
