"""`grnx run` (h5ad -> rank_value) against Geneformer's `tokenize_data` on the same file: whole processes.

For each ``--cells`` N (default 50,000 and 200,000) it writes, once, into ``--workdir`` (default
``/tmp/grnx-bench-rank-value``, reused when present) ``cells_<N>x<G>_<NNZ>.h5ad``: N cells x G
(20,000) columns of random integer counts, about NNZ (2,000) non-zero per cell, CSR float32
(``bench_tokenizers.write_counts_h5ad``), ``obs`` ``donor`` and ``n_counts`` (float64), and in
``var["ensembl_id"]`` the first G - 20 genes of Geneformer's V2 token dictionary followed by 20
duplicated ids: 10 exact copies of genes present and 10 other ids that the V2 mapping sends to
genes present (many-to-one, so both tokenizers sum the duplicated genes: Geneformer's collapse
path). Then, each a whole process measured from outside (``bench_engine.run_measured``: wall and
CPU seconds of the process and its children, peak resident memory of the largest process, the h5ad
evicted from the page cache first):

- numba compile: ``grnx run`` on a 2,000-cell file of the same layout with an empty
  ``NUMBA_CACHE_DIR``, minus the same run once the cache is filled: the first run's compile time
  on a machine (and after each change of the kernels), reported separately; every other run uses
  the filled cache;
- ``grnx run --no-track`` of ``rank_value_<N>.yaml`` (``data: h5ad`` with ``backed: true`` ->
  ``rank_value`` V2, ``n_workers`` 1, chunks of 2,048) on a fresh cache: file digest, data stage,
  tokens streamed into the cache;
- the same with ``tokenizer.params.export=geneformer``: also Geneformer's ``.dataset``, the output
  ``tokenize_data`` writes;
- when ``GENEFORMER_SRC`` names a clone of Geneformer's repository (the folder holding the
  ``geneformer`` package; its tokenizer needs loompy, e.g. ``pip install loompy``),
  ``TranscriptomeTokenizer(model_version="V2", nproc=1).tokenize_data`` on the same file in a
  python process of its own (``bench_tokenizers.py --worker --geneformer``, which reports the
  whole process: interpreter start, imports, dictionaries, tokenising, saving).

Printed: one row per measurement; the CPU-time ratio Geneformer / grnx (targets: >= 10x at 50,000
cells, >= 20x at 200,000); the ``backed: true`` peak of the whole ``grnx run`` against 1 GB (1e9
bytes) and its growth from the smallest to the largest N (flat: within 10%); and how many cells
the two ``.dataset`` folders hold identical (and identical outside runs of tied values).

    python benchmarks/bench_rank_value.py                               # 50k and 200k, grnx only
    GENEFORMER_SRC=~/src/Geneformer python benchmarks/bench_rank_value.py   # and Geneformer (~10 min)
    python benchmarks/bench_rank_value.py --cells 20000 --genes 5000 --nnz 500   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

from bench_engine import run_measured  # noqa: E402
from bench_tokenizers import (  # noqa: E402
    DEFAULT_DICTIONARIES,
    compare_token_sets,
    read_dataset_tokens,
    run_measurement,
    write_counts_h5ad,
)

MIB = 2**20
PEAK_LIMIT_BYTES = 1e9
CPU_RATIO_TARGETS = {50_000: 10.0, 200_000: 20.0}
N_EXACT_COPIES = N_ALIASES = 10
COMPILE_CELLS = 2_000


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def duplicated_gene_ids(
    dictionaries: Path, n_columns: int, seed: int = 0
) -> tuple[list[str], dict[str, int]]:
    """``n_columns`` ids: V2 token genes, then exact copies and many-to-one aliases of some of them."""
    import pandas as pd

    tokens = pd.read_csv(dictionaries / "token_dictionary_gc95M.tsv", sep="\t").iloc[:, 0].astype(str)
    genes = [g for g in tokens if not g.startswith("<")][: n_columns - N_EXACT_COPIES - N_ALIASES]
    mapping = pd.read_csv(dictionaries / "ensembl_mapping_dict_gc95M.tsv", sep="\t", dtype=str)
    mapping.columns = ["id", "target"]
    present = set(genes)
    aliases = mapping[(mapping["id"] != mapping["target"]) & mapping["target"].isin(present)]
    aliases = aliases[aliases["id"] == aliases["id"].str.upper()].drop_duplicates("target")
    rng = np.random.default_rng(seed)
    # Copies of genes common enough to be expressed in many cells (the writer's popularity is random:
    # any gene may be rare, so the copies are spread over the first half).
    copies = [genes[i] for i in rng.choice(len(genes) // 2, N_EXACT_COPIES, replace=False)]
    alias_ids = aliases.sample(N_ALIASES, random_state=seed)["id"].tolist()
    return genes + copies + alias_ids, {"exact copies": len(copies), "aliases": len(alias_ids)}


def write_input(path: Path, dictionaries: Path, n_cells: int, n_genes: int, nnz: int) -> None:
    ids, _ = duplicated_gene_ids(dictionaries, n_genes)
    write_counts_h5ad(path, ids, n_cells, nnz, var_names=[f"column{j}" for j in range(len(ids))])


def write_recipe(path: Path, h5ad: Path, dictionaries: Path, workers: int, chunk_size: int) -> None:
    tokenizer = {
        "model_version": "V2",
        "dictionary_dir": str(dictionaries),
        "gene_id_key": "ensembl_id",
        "n_workers": workers,
        "chunk_size": chunk_size,
    }
    lines = [
        "# Written by benchmarks/bench_rank_value.py: a backed h5ad -> Geneformer V2 rank-value tokens.",
        f"# Run:      GRNX_CACHE_DIR={path.parent / 'cache'} grnx run {path} --no-track",
        f"# Override: grnx run {path} --no-track tokenizer.params.export=geneformer",
        "schema_version: 1",
        "name: bench-rank-value",
        "version: 1",
        "seed: 0",
        f"data: {{name: h5ad, params: {{path: {json.dumps(str(h5ad))}, backed: true}}, donor_key: donor}}",
        f"tokenizer: {{name: rank_value, params: {json.dumps(tokenizer)}}}",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def grnx_run(recipe: Path, cache: Path, h5ad: Path, *overrides: str) -> dict:
    """``grnx run --no-track`` on an empty cache, measured whole (``bench_engine.run_measured``)."""
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    row = run_measured(["run", str(recipe), "--no-track", *overrides], cache, h5ad)
    row["tokenize_seconds"] = next((s["seconds"] for s in row["stages"] if s["stage"] == "tokenize"), None)
    return row


def compile_time(workdir: Path, dictionaries: Path, args: argparse.Namespace) -> tuple[dict, dict]:
    """A small run with an empty numba cache, then with the cache filled by it."""
    h5ad = workdir / f"cells_{COMPILE_CELLS}x{args.genes}_{args.nnz}.h5ad"
    if not h5ad.exists():
        write_input(h5ad, dictionaries, COMPILE_CELLS, args.genes, args.nnz)
    recipe = workdir / "rank_value_compile.yaml"
    write_recipe(recipe, h5ad, dictionaries, args.workers, args.chunk_size)
    shutil.rmtree(os.environ["NUMBA_CACHE_DIR"], ignore_errors=True)
    cold = grnx_run(recipe, workdir / "cache", h5ad)
    warm = grnx_run(recipe, workdir / "cache", h5ad)
    return cold, warm


def geneformer_run(source: str, h5ad: Path, dictionaries: Path, scratch: Path) -> dict:
    """Geneformer's tokenize_data in a python process of its own (bench_tokenizers' worker); its
    ``.dataset`` stays in the returned ``out`` folder."""
    extra = ["--geneformer", source, "--geneformer-nproc", "1"]
    return run_measurement(
        h5ad, dictionaries, "rank_value", 1, 512, None, scratch, extra=extra, keep_output=True
    )


def exported_dataset(cache: Path) -> Path:
    """The ``.dataset`` the export run logged into its tokenize cache entry."""
    found = sorted(cache.glob("tokenize/*/*/logged/tokens/geneformer.dataset/geneformer.dataset"))
    if len(found) != 1:
        raise SystemExit(f"expected one exported .dataset in {cache}, found {len(found)}")
    return found[0]


def compare(ours: Path, theirs: Path, h5ad: Path, dictionaries: Path) -> str:
    """Cells identical in the two ``.dataset`` folders, and identical outside tied values."""

    our_offsets, our_ids, our_donors = read_dataset_tokens(ours)
    their_offsets, their_ids, their_donors = read_dataset_tokens(theirs)
    n = len(our_offsets) - 1
    if n != len(their_offsets) - 1:
        return f"DISAGREE: {n:,} cells from grnx, {len(their_offsets) - 1:,} from Geneformer"
    differing, outside = compare_token_sets(
        h5ad, dictionaries, (our_offsets, our_ids), (their_offsets, their_ids)
    )
    dtypes = f"input_ids {our_ids.dtype} / {their_ids.dtype}"
    donors = "identical" if our_donors == their_donors else "DIFFER"
    return (
        f"cells identical {n - len(differing):,}/{n:,}, identical outside tied values "
        f"{n - len(differing) + outside:,}/{n:,}; donor column {donors}; {dtypes}"
    )


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def whole_process(row: dict) -> tuple[float, float, float, float]:
    """(wall s, CPU s, peak MiB, tokenize s) of a grnx run or of the Geneformer process."""
    if "process_seconds" in row:  # Geneformer's worker reports its own process
        peak = max(row["peak_main_mib"], row["peak_worker_mib"])
        return row["process_seconds"], row["process_cpu_seconds"], peak, row["seconds"]
    return row["seconds"], row["cpu_seconds"], row["peak_mib"], row["tokenize_seconds"] or 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cells", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--genes", type=int, default=20_000, help="columns, 20 of them duplicated ids")
    parser.add_argument("--nnz", type=int, default=2_000, help="non-zero genes per cell (about)")
    parser.add_argument(
        "--workers", type=int, default=1, help="rank_value n_workers (1: the whole run is one process)"
    )
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument(
        "--workdir", default="/tmp/grnx-bench-rank-value", help="h5ad files (kept), recipes, caches"
    )
    parser.add_argument(
        "--no-geneformer", action="store_true", help="skip Geneformer even when GENEFORMER_SRC is set"
    )
    args = parser.parse_args()

    dictionaries = DEFAULT_DICTIONARIES
    if not (dictionaries / "token_dictionary_gc95M.tsv").exists():
        raise SystemExit(
            f"Geneformer's V2 dictionaries are not at {dictionaries} (../shared/data beside the project)."
        )
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["NUMBA_CACHE_DIR"] = str(workdir / "numba-cache")
    source = None if args.no_geneformer else os.environ.get("GENEFORMER_SRC")
    ids, duplicated = duplicated_gene_ids(dictionaries, args.genes)
    load = os.getloadavg()
    print(
        f"{args.genes:,} columns ({', '.join(f'{v} {k}' for k, v in duplicated.items())} among them), "
        f"~{args.nnz:,} non-zeros per cell; V2 dictionaries {dictionaries}; rank_value n_workers "
        f"{args.workers}, chunks of {args.chunk_size}; CPUs {os.cpu_count()}, load average {load[0]:.1f}"
    )

    cold, warm = compile_time(workdir, dictionaries, args)
    print(
        f"numba compile (first run on a machine, {COMPILE_CELLS:,} cells): empty cache {cold['seconds']:.1f} s "
        f"wall / {cold['cpu_seconds']:.1f} CPU s, filled cache {warm['seconds']:.1f} / {warm['cpu_seconds']:.1f}: "
        f"compile {cold['seconds'] - warm['seconds']:.1f} s wall, {cold['cpu_seconds'] - warm['cpu_seconds']:.1f} CPU s"
    )

    rows: list[tuple[int, str, dict]] = []
    comparisons: dict[int, str] = {}
    for n_cells in args.cells:
        h5ad = workdir / f"cells_{n_cells}x{args.genes}_{args.nnz}.h5ad"
        if not h5ad.exists():
            print(f"writing {h5ad} ...", flush=True)
            write_input(h5ad, dictionaries, n_cells, args.genes, args.nnz)
        recipe = workdir / f"rank_value_{n_cells}.yaml"
        write_recipe(recipe, h5ad, dictionaries, args.workers, args.chunk_size)
        cache = workdir / "cache"
        rows.append((n_cells, "grnx run (tokens)", grnx_run(recipe, cache, h5ad)))
        rows.append(
            (
                n_cells,
                "grnx run (export: geneformer)",
                grnx_run(recipe, cache, h5ad, "tokenizer.params.export=geneformer"),
            )
        )
        if source:
            scratch = Path(tempfile.mkdtemp(prefix="geneformer-", dir=workdir))
            try:
                theirs = geneformer_run(source, h5ad, dictionaries, scratch)
                rows.append((n_cells, "Geneformer tokenize_data", theirs))
                comparisons[n_cells] = compare(
                    exported_dataset(cache), Path(theirs["out"]) / "geneformer.dataset", h5ad, dictionaries
                )
            except SystemExit as error:  # report, do not hide, a Geneformer that does not run
                comparisons[n_cells] = f"Geneformer did not run: {error}"
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        h5ad_mib = h5ad.stat().st_size / MIB
        print(f"  {n_cells:,} cells done (h5ad {h5ad_mib:,.0f} MiB)", flush=True)

    print(f"\n{'cells':>8}  {'':<30}{'wall s':>8}{'CPU s':>8}{'peak MiB':>10}{'tokenize s':>12}")
    for n_cells, label, row in rows:
        wall, cpu, peak, tokenize = whole_process(row)
        print(f"{n_cells:>8,}  {label:<30}{wall:>8.1f}{cpu:>8.1f}{peak:>10,.0f}{tokenize:>12.1f}")
    print(
        "wall/CPU: whole processes (grnx: measured from outside, workers included; Geneformer: its python "
        "process from interpreter start). peak: the largest process. 'tokenize s': grnx's tokenize stage, "
        "Geneformer's tokenize_data call."
    )

    print("\ntargets:")
    by_cells: dict[int, dict[str, dict]] = {}
    for n_cells, label, row in rows:
        by_cells.setdefault(n_cells, {})[label] = row
    for n_cells, measured in by_cells.items():
        target = CPU_RATIO_TARGETS.get(n_cells)
        theirs = measured.get("Geneformer tokenize_data")
        for label in ("grnx run (tokens)", "grnx run (export: geneformer)"):
            ours = measured[label]
            if theirs is None:
                print(f"  {n_cells:,} cells, {label}: Geneformer not run (set GENEFORMER_SRC)")
                continue
            ratio = whole_process(theirs)[1] / whole_process(ours)[1]
            verdict = (
                ""
                if target is None
                else f" (target >= {target:.0f}x: {'met' if ratio >= target else 'NOT met'})"
            )
            wall_ratio = whole_process(theirs)[0] / whole_process(ours)[0]
            print(
                f"  {n_cells:,} cells, {label}: CPU-time ratio {ratio:.1f}x{verdict}, wall ratio {wall_ratio:.1f}x"
            )
        if n_cells in comparisons:
            print(f"  {n_cells:,} cells, .dataset of grnx vs Geneformer: {comparisons[n_cells]}")
    for label in ("grnx run (tokens)", "grnx run (export: geneformer)"):
        peaks = {n: measured[label]["peak_mib"] for n, measured in by_cells.items()}
        worst = max(peaks.values())
        smallest, largest = min(peaks), max(peaks)
        growth = peaks[largest] / peaks[smallest] - 1
        print(
            f"  backed peak, {label}: {', '.join(f'{n:,} cells {p:,.0f} MiB' for n, p in peaks.items())}; "
            f"limit 1 GB ({PEAK_LIMIT_BYTES / MIB:,.0f} MiB): {'met' if worst * MIB <= PEAK_LIMIT_BYTES else 'NOT met'}; "
            f"{largest / smallest:.0f}x the cells: {100 * growth:+.1f}% ({'flat' if abs(growth) <= 0.10 else 'NOT flat'})"
        )


if __name__ == "__main__":
    main()
