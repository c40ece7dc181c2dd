"""`grnx run` on a backed h5ad, cold and fully cached: time, CPU, peak memory and bytes read.

Writes into ``--workdir`` (default ``/tmp/grnx-bench-engine``), reusing the h5ad when present:

- ``cells_<N>x<G>_<NNZ>.h5ad``: N cells x G genes of random integer counts, about NNZ non-zero
  genes per cell, CSR ``X`` written 5,000 cells at a time (``bench_tokenizers.write_counts_h5ad``,
  in a subprocess whose peak memory is printed), gene symbols as ``var_names`` (Geneformer's V2
  ``gene_name_id_dict`` when ``../shared/data`` has it, else ``GENE1``, ``GENE2``, ...), and
  ``obs`` columns ``donor`` (8 donors), ``label`` (``case`` / ``control``) and ``n_counts``;
- ``engine_<N>x<G>.yaml``: the recipe: ``data: {name: h5ad, params: {path, backed: true},
  label_key: label}``, no preprocessing, ``tokenizer: expression_scaled`` (``max_length`` 2048,
  written chunk by chunk into the cache), and the consumer that makes the tokenize stage run
  (``--consumer``, below);
- ``cache/``: the ``GRNX_CACHE_DIR`` of the runs, emptied at the start of every invocation.

Then, each in a fresh helper subprocess (so ``ru_maxrss`` and the CPU seconds are those of one
``grnx`` process and what it waited for), it runs ``grnx run <recipe> --no-track`` twice on that
cache (cold, then fully cached) and ``grnx validate <recipe>`` (what starting grnx and resolving
the recipe cost alone), and prints for each: wall and CPU seconds (``ru_utime + ru_stime``), peak
resident memory, the peak up to the end of the tokenize stage (``VmHWM`` read as grnx reports the
stage), ``rchar`` and ``read_bytes`` from ``/proc/<pid>/io`` (read after the process exits, before it
is reaped), and how much of the h5ad the run brought into the page cache (the file is evicted with
``posix_fadvise(DONTNEED)`` before each run and its resident pages counted with ``mincore`` after:
the bytes of the h5ad read, to the page). Then the cold/cached ratios and the engine issue's two
targets: peak memory of the data + tokenize stages <= 1.5 GB (1.5e9 bytes), and a fully cached
rerun that reads < 1% of the h5ad.

The consumer: by default (``--consumer none``) the recipe is exactly the engine issue's, data +
tokenizer; the tokenize stage always runs when the recipe has a tokenizer. ``--consumer
celluformer`` adds a ``uniform`` sampler of 8 cells and a 1-block CelluFormer of width 8 trained
for one epoch on them (``model.cells: sample``), to see a model stage served from the cache too;
torch is imported only after the tokenize stage, so the data + tokenize peak excludes it.

    python benchmarks/bench_engine.py                    # 50,000 x 20,000, ~2,000 non-zeros per cell (~0.8 GB h5ad)
    python benchmarks/bench_engine.py --quick            # 5,000 x 2,000, ~200 non-zeros per cell
    python benchmarks/bench_engine.py --cells 200000 --workers 2 --workdir /data/bench
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GENE_SYMBOLS = REPO.parent / "shared" / "data" / "geneformer" / "v2" / "gene_name_id_dict_gc95M.tsv"
MIB = 2**20
#: The engine issue's targets.
PEAK_LIMIT_BYTES = 1.5e9
CACHED_READ_LIMIT = 0.01  # of the h5ad's size
STAGE_LINE = re.compile(r"^\[grnx\] (?P<stage>\S+): (?:cached|done in (?P<seconds>[\d.]+) s)")


# ---------------------------------------------------------------------------------------------
# Input: the h5ad and the recipe
# ---------------------------------------------------------------------------------------------


def gene_symbols(n_genes: int) -> list[str]:
    """``n_genes`` distinct gene symbols: Geneformer V2's when available, else ``GENE1``... ."""
    if GENE_SYMBOLS.exists():
        import pandas as pd

        symbols = pd.read_csv(GENE_SYMBOLS, sep="\t")["gene_symbol"].astype(str).drop_duplicates()
        if len(symbols) >= n_genes:
            return list(symbols[:n_genes])
    return [f"GENE{i + 1}" for i in range(n_genes)]


def write_h5ad(path: Path, n_cells: int, n_genes: int, nnz: int) -> None:
    """The benchmark's h5ad: ``bench_tokenizers``' chunked writer, then symbols and a label column.

    ``write_counts_h5ad`` keys ``var`` by the names it is given (with an ``ensembl_id`` column) and
    writes ``obs`` with ``donor`` and ``n_counts``; both tables are small, so they are rewritten
    in place rather than the writer copied here.
    """
    import h5py
    import pandas as pd
    from anndata.io import read_elem, write_elem

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_tokenizers import write_counts_h5ad

    genes = gene_symbols(n_genes)
    writing = path.with_name(path.stem + ".writing.h5ad")
    write_counts_h5ad(writing, genes, n_cells, nnz)
    rng = np.random.default_rng(2)
    with h5py.File(writing, "r+") as handle:
        obs = read_elem(handle["obs"])
        obs["label"] = pd.Categorical(rng.choice(["case", "control"], n_cells))
        del handle["obs"], handle["var"]
        write_elem(handle, "obs", obs[["donor", "label", "n_counts"]])
        write_elem(handle, "var", pd.DataFrame(index=pd.Index(genes, name="gene_symbol")))
    writing.rename(path)


def write_recipe(path: Path, h5ad: Path, consumer: str, workers: int, chunk_size: int) -> None:
    tokenizer = {"max_length": 2048, "chunk_size": chunk_size, "n_workers": workers}
    lines = [
        f"# Written by benchmarks/bench_engine.py (consumer: {consumer}).",
        f"# Run:      GRNX_CACHE_DIR={path.parent / 'cache'} grnx run {path} --no-track",
        f"# Override: grnx run {path} --no-track tokenizer.params.n_workers=2",
        "schema_version: 1",
        "name: bench-engine",
        "version: 1",
        "seed: 0",
        f"data: {{name: h5ad, params: {{path: {json.dumps(str(h5ad))}, backed: true}}, label_key: label}}",
        f"tokenizer: {{name: expression_scaled, params: {json.dumps(tokenizer)}}}",
    ]
    if consumer == "celluformer":
        lines += [
            "# Only what makes the tokenize stage run (grnx computes a stage when a later one reads it):",
            "sampler: {name: uniform, params: {n_cells: 8}}",
            "model:",
            "  name: celluformer",
            "  params: {d_model: 8, n_layers: 1, n_heads: 1, d_ff: 8, dropout: 0.0}",
            "  cells: sample",
            "train: {epochs: 1, batch_size: 4, validation_fraction: 0.0, device: cpu}",
        ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# The page cache: what a run read of the h5ad
# ---------------------------------------------------------------------------------------------


def evict(path: Path) -> None:
    """Drop the file's clean pages from the page cache (needs no privileges)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_bytes(path: Path) -> int:
    """Bytes of the file in the page cache (``mincore`` over a mapping that touches no page)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, 0x1, 0x1, fd, 0)  # PROT_READ, MAP_SHARED
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            pages = (ctypes.c_ubyte * ((size + page - 1) // page))()
            if libc.mincore(address, size, pages) != 0:
                raise OSError(ctypes.get_errno(), f"mincore on {path} failed")
            return int((np.frombuffer(pages, dtype=np.uint8) & 1).sum()) * page
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# One grnx process, measured by a helper subprocess of its own
# ---------------------------------------------------------------------------------------------


def proc_fields(pid: int, name: str) -> dict[str, int]:
    """``/proc/<pid>/<name>`` as numbers (``io`` in bytes; ``status`` memory lines in KiB)."""
    fields = {}
    try:
        text = Path(f"/proc/{pid}/{name}").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            fields[key] = int(parts[0])
    return fields


def measure_grnx(grnx_args: list[str], cache: Path) -> dict:
    """Run grnx with ``grnx_args``; its wall/CPU seconds, peak memory, reads and stage reports."""
    beside = Path(sys.executable).with_name("grnx")  # the grnx of this interpreter's environment
    grnx = str(beside) if beside.exists() else shutil.which("grnx") or "grnx"
    env = dict(os.environ, GRNX_CACHE_DIR=str(cache))
    started = time.perf_counter()
    process = subprocess.Popen(
        [grnx, *grnx_args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    stages: list[dict] = []
    errors: list[str] = []

    def follow_stderr() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            match = STAGE_LINE.match(line)
            if match is None:
                errors.append(line)
                continue
            # VmHWM is the peak so far: read as the stage reports, it is the peak up to its end.
            status = proc_fields(process.pid, "status")
            stages.append(
                {
                    "stage": match["stage"],
                    "cached": match["seconds"] is None,
                    "seconds": float(match["seconds"]) if match["seconds"] else None,
                    "peak_mib_so_far": status.get("VmHWM", 0) / 1024,
                    "elapsed": time.perf_counter() - started,
                }
            )

    reader = threading.Thread(target=follow_stderr)
    reader.start()
    stdout = process.stdout.read() if process.stdout is not None else ""
    # Wait for the exit without reaping, so /proc/<pid>/io still holds the whole run's counters.
    os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
    seconds = time.perf_counter() - started
    io = proc_fields(process.pid, "io")
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    return {
        "returncode": process.returncode,
        "output": stdout + "".join(errors),
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_mib": usage.ru_maxrss / 1024,
        "rchar": io.get("rchar", -1),
        "read_bytes": io.get("read_bytes", -1),
        "stages": stages,
    }


def run_measured(grnx_args: list[str], cache: Path, h5ad: Path) -> dict:
    """``measure_grnx`` in a fresh subprocess, with the h5ad evicted before and counted after."""
    evict(h5ad)
    resident_before = resident_bytes(h5ad)
    command = [sys.executable, __file__, "--measure", json.dumps(grnx_args), "--cache", str(cache)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"the measuring helper failed:\n{result.stdout}{result.stderr}")
    row = json.loads(result.stdout)
    if row["returncode"] != 0:
        raise SystemExit(f"grnx {' '.join(grnx_args)} failed (exit {row['returncode']}):\n{row['output']}")
    row["resident_before"] = resident_before
    row["h5ad_read"] = resident_bytes(h5ad) - resident_before
    return row


def run_writer(path: Path, n_cells: int, n_genes: int, nnz: int) -> tuple[float, float]:
    """Write the h5ad in a subprocess; its seconds and peak MiB."""
    started = time.perf_counter()
    command = [
        sys.executable,
        __file__,
        "--write",
        str(path),
        "--cells",
        str(n_cells),
        "--genes",
        str(n_genes),
        "--nnz",
        str(nnz),
    ]
    subprocess.run(command, check=True)
    return time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def tokenize_peak(row: dict) -> float | None:
    """Peak MiB up to the end of the tokenize stage, when it ran (not from the cache)."""
    for stage in row["stages"]:
        if stage["stage"] == "tokenize" and not stage["cached"]:
            return stage["peak_mib_so_far"]
    return None


def stage_summary(row: dict) -> str:
    """Each reported stage: cached, or its seconds and the run's peak MiB when it finished."""
    parts = [
        f"{s['stage']} cached"
        if s["cached"]
        else f"{s['stage']} {s['seconds']:.1f} s/{s['peak_mib_so_far']:,.0f} MiB"
        for s in row["stages"]
    ]
    return ", ".join(parts) or "(none reported)"


def report(rows: dict[str, dict], h5ad: Path) -> None:
    size = h5ad.stat().st_size
    print(
        f"\n{'':<30}{'wall s':>8}{'CPU s':>8}{'peak MiB':>10}{'to tokenize':>13}{'rchar MiB':>11}"
        f"{'read_bytes':>12}{'h5ad read':>11}  stages"
    )
    for label, row in rows.items():
        through_tokenize = tokenize_peak(row)
        print(
            f"{label:<30}{row['seconds']:>8.1f}{row['cpu_seconds']:>8.1f}{row['peak_mib']:>10,.0f}"
            f"{'-' if through_tokenize is None else f'{through_tokenize:,.0f}':>13}"
            f"{row['rchar'] / MIB:>11,.1f}{row['read_bytes'] / MIB:>12,.1f}{row['h5ad_read'] / MIB:>11,.1f}"
            f"  {stage_summary(row)}"
        )
    cold, cached = rows["cold"], rows["fully cached"]
    print(
        f"{'cold / fully cached':<30}{cold['seconds'] / cached['seconds']:>7.1f}x"
        f"{cold['cpu_seconds'] / cached['cpu_seconds']:>7.1f}x{cold['peak_mib'] / cached['peak_mib']:>9.1f}x"
        f"{'':>13}{cold['rchar'] / max(cached['rchar'], 1):>10.1f}x"
    )
    print(
        f"h5ad: {size / MIB:,.1f} MiB. 'to tokenize' = peak MiB up to the end of the tokenize stage "
        f"(and 's/MiB' in stages: a stage's seconds, the peak when it finished); 'rchar' = every read() and pread(), pipes included; 'read_bytes' = from the block device; 'h5ad read' = the h5ad's pages the run "
        f"brought into the page cache (evicted before each run; {max(r['resident_before'] for r in rows.values()) / MIB:.1f} "
        f"MiB stayed resident after eviction). Stage seconds are grnx's own; a stage computed inside "
        f"another (tokenize inside model) counts in both. The file digest that keys the data stage "
        f"is taken while grnx plans the keys, before any stage starts."
    )

    print("\ntargets (engine issue):")
    through_tokenize = tokenize_peak(cold)
    if through_tokenize is None:
        print(
            "  peak of data + tokenize <= 1.5 GB: NOT MEASURED: the cold run did not compute the tokenize "
            f"stage (stages: {stage_summary(cold)}); grnx runs a stage only when a later one reads it."
        )
    else:
        peak_bytes = through_tokenize * MIB
        print(
            f"  peak of data + tokenize (cold): {through_tokenize:,.0f} MiB = {peak_bytes / 1e9:.2f} GB, limit "
            f"1.50 GB ({PEAK_LIMIT_BYTES / MIB:,.0f} MiB): {'met' if peak_bytes <= PEAK_LIMIT_BYTES else 'NOT met'}"
            f" (whole run incl. the consumer: {cold['peak_mib']:,.0f} MiB)"
        )
    fraction = cached["h5ad_read"] / size
    startup = rows["startup (grnx validate)"]
    above_startup = cached["rchar"] - startup["rchar"]
    print(
        f"  fully cached rerun read of the h5ad: {cached['h5ad_read'] / MIB:,.2f} MiB of {size / MIB:,.1f} MiB = "
        f"{100 * fraction:.3f}%, limit {100 * CACHED_READ_LIMIT:.0f}%: "
        f"{'met' if fraction < CACHED_READ_LIMIT else 'NOT met'}; all its reads (rchar) "
        f"{cached['rchar'] / MIB:,.1f} MiB = {100 * cached['rchar'] / size:.2f}% of the h5ad, of which "
        f"{startup['rchar'] / MIB:,.1f} MiB starting grnx (validate), {above_startup / MIB:,.1f} MiB above it "
        f"({100 * above_startup / size:.2f}%)"
    )
    tokenized = next((s["elapsed"] for s in cold["stages"] if s["stage"] == "tokenize"), None)
    print(
        f"  fully cached rerun {cached['seconds']:.1f} s wall, {cached['cpu_seconds']:.1f} CPU s; cold "
        f"{cold['seconds']:.1f} s wall, {cold['cpu_seconds']:.1f} CPU s"
        + ("" if tokenized is None else f", its tokenize stage done {tokenized:.1f} s after the start")
    )


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="5,000 cells x 2,000 genes, ~200 non-zeros per cell (the same density)",
    )
    parser.add_argument("--cells", type=int, default=50_000, help="cells in the h5ad (default 50,000)")
    parser.add_argument("--genes", type=int, default=20_000, help="genes in the h5ad (default 20,000)")
    parser.add_argument(
        "--nnz",
        type=int,
        default=None,
        help="non-zero genes per cell, about (default 2,000; 200 with --quick)",
    )
    parser.add_argument(
        "--workdir",
        default="/tmp/grnx-bench-engine",
        help="folder for the h5ad (kept and reused), the recipe and the cache (emptied each time)",
    )
    parser.add_argument(
        "--consumer",
        choices=("celluformer", "none"),
        default="none",
        help="what follows the tokenizer: nothing (default: the recipe as the engine issue states it), or "
        "an 8-cell sample and a width-8 CelluFormer trained one epoch (to include a model stage)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="tokenizer n_workers (default 1; with more, 'peak MiB' is the largest single process and "
        "'to tokenize' the main process alone, so the data + tokenize target is not measured whole)",
    )
    parser.add_argument("--chunk-size", type=int, default=2048, help="tokenizer chunk_size: cells per chunk")
    # Internal: one measured grnx process, or the h5ad writer, each in a subprocess of its own.
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--write", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_grnx(json.loads(args.measure), Path(args.cache))))
        return
    if args.write:
        write_h5ad(Path(args.write), args.cells, args.genes, args.nnz)
        return

    n_cells, n_genes = (5_000, 2_000) if args.quick else (args.cells, args.genes)
    nnz = args.nnz or (200 if args.quick else 2_000)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    h5ad = workdir / f"cells_{n_cells}x{n_genes}_{nnz}.h5ad"
    if h5ad.exists():
        print(f"reusing {h5ad} ({h5ad.stat().st_size / MIB:,.1f} MiB)")
    else:
        seconds, peak = run_writer(h5ad, n_cells, n_genes, nnz)
        print(
            f"wrote {h5ad} ({h5ad.stat().st_size / MIB:,.1f} MiB) in {seconds:.0f} s, writer peak {peak:,.0f} MiB"
        )
    recipe = workdir / f"engine_{n_cells}x{n_genes}.yaml"
    write_recipe(recipe, h5ad, args.consumer, args.workers, args.chunk_size)
    cache = workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir()
    load = os.getloadavg()
    print(
        f"{n_cells:,} cells x {n_genes:,} genes, ~{nnz:,} non-zeros per cell; recipe {recipe} "
        f"(consumer: {args.consumer}); cache {cache}; CPUs {os.cpu_count()}, load average {load[0]:.1f}"
    )
    run = ["run", str(recipe), "--no-track"]
    rows = {
        "cold": run_measured(run, cache, h5ad),
        "fully cached": run_measured(run, cache, h5ad),
        "startup (grnx validate)": run_measured(["validate", str(recipe)], cache, h5ad),
    }
    report(rows, h5ad)


if __name__ == "__main__":
    main()
