"""Tokenizer speed and memory on a synthetic backed h5ad, side by side with per-cell reference loops.

Writes (once, chunk by chunk) a backed ``.h5ad`` of N synthetic cells with about NNZ non-zero
integer counts per cell over Ensembl-id genes of the Geneformer V2 dictionary, then, each in a
fresh subprocess so that peak resident memory (``ru_maxrss``) is its own, streams it through
``rank_value`` (V2), ``expression_scaled`` and ``binned`` into token folders on disk, and prints
cells/s and peak memory (main process and worst worker). ``rank_value`` also runs on the first
quarter of the cells: its peak memory should not change with the number of cells.

References, on the first few thousand cells of the same file:
- "geneformer-style": Geneformer's ``tokenize_anndata`` algorithm re-implemented here (normalise
  a chunk of 512 cells with sparse/dense numpy, then ``np.argsort(-v)`` per cell in a Python
  loop), with the outputs checked against grnx's (equal outside tied values);
- "naive": one cell at a time, one gene at a time, in plain Python.
- If GENEFORMER_SRC points at a clone of Geneformer's repository (the folder holding the
  ``geneformer`` package; never committed here; its tokenizer needs loompy, scanpy and datasets),
  Geneformer's own ``TranscriptomeTokenizer.tokenize_data`` (V2 API, September 2024 or later)
  turns the same h5ad (all cells, or ``--geneformer-cells``) into a ``.dataset`` in a subprocess
  of its own, and grnx does the same job with ``rank_value`` (its token folder, then the
  ``.dataset`` export). Printed: both timings and peak memory, the speed ratios, the 20x target,
  and how many cells the two ``.dataset`` folders hold identical (and identical outside tied
  values). Only ``geneformer/tokenizer.py`` is imported: the package's ``__init__`` pulls in
  torch-based modules tokenizing does not need.

    python benchmarks/bench_tokenizers.py                 # 200k cells x ~2,000 genes (~3.3 GB h5ad in /tmp)
    python benchmarks/bench_tokenizers.py --quick         # 20k cells
    python benchmarks/bench_tokenizers.py --cells 50000 --workers 2 --tokenizers rank_value
    GENEFORMER_SRC=~/src/Geneformer python benchmarks/bench_tokenizers.py --tokenizers rank_value
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DICTIONARIES = REPO.parent / "shared" / "data" / "geneformer" / "v2"
TOKENIZERS = ("rank_value", "expression_scaled", "binned")


# ---------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------


def dictionary_genes(dictionary_dir: Path | None, n_genes: int, folder: Path) -> tuple[list[str], Path]:
    """Ensembl ids to use as genes, and a folder of V2-style dictionaries covering them.

    Uses the real Geneformer V2 dictionaries when present (first ``n_genes`` token genes), else
    writes synthetic ones (random medians) so the benchmark runs anywhere.
    """
    if dictionary_dir is not None and (dictionary_dir / "token_dictionary_gc95M.tsv").exists():
        import pandas as pd

        tokens = pd.read_csv(dictionary_dir / "token_dictionary_gc95M.tsv", sep="\t")
        genes = [g for g in tokens.iloc[:, 0] if not g.startswith("<")][:n_genes]
        return genes, dictionary_dir
    rng = np.random.default_rng(1)
    genes = [f"ENSG{i:011d}" for i in range(n_genes)]
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<mask>", "<cls>", "<eos>"]
    (folder / "token_dictionary.json").write_text(json.dumps({t: i for i, t in enumerate(specials + genes)}))
    (folder / "gene_median_dictionary.json").write_text(
        json.dumps({g: float(m) for g, m in zip(genes, rng.lognormal(0.5, 0.7, n_genes))})
    )
    return genes, folder


def write_counts_h5ad(
    path: Path, genes: list[str], n_cells: int, nnz: int, seed: int = 0, var_names: list[str] | None = None
) -> None:
    """Random integer counts, ~``nnz`` distinct genes per cell, written 5,000 cells at a time.

    ``var["ensembl_id"]`` holds ``genes`` (which may repeat ids); ``var_names`` (default: ``genes``)
    index the columns.
    """
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    rng = np.random.default_rng(seed)
    n_genes = len(genes)
    # Gene popularity and mean count vary, as in real data (a few genes in every cell, most rare).
    popularity = rng.pareto(1.2, n_genes) + 0.05
    popularity /= popularity.sum()
    mean_count = rng.lognormal(0.0, 1.0, n_genes)

    def distinct_genes(rows: int, draws: int) -> tuple[np.ndarray, np.ndarray]:
        drawn = rng.choice(n_genes, size=(rows, draws), p=popularity).astype(np.int32)
        drawn.sort(axis=1)
        first = np.ones(drawn.shape, dtype=bool)
        first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
        return drawn[first], np.concatenate([[0], np.cumsum(first.sum(axis=1))]).astype(np.int64)

    # Popular genes repeat among the draws: find how many draws give ``nnz`` distinct genes.
    draws = nnz
    for _ in range(4):
        _, pilot = distinct_genes(200, draws)
        draws = int(draws * nnz / (pilot[-1] / 200))
    partial = path.with_suffix(".partial")
    with h5py.File(partial, "w") as handle:
        # var["ensembl_id"] and obs["n_counts"] are what Geneformer's own tokenizer requires.
        write_elem(handle, "var", pd.DataFrame({"ensembl_id": genes}, index=var_names or genes))
        # The CSR layout anndata writes, with large HDF5 chunks (anndata's own appends use tiny
        # ones, which doubles the read cost; files written by write_h5ad are contiguous).
        group = handle.create_group("X")
        group.attrs.update(
            {"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_cells, n_genes)}
        )
        data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 22,))
        indices = group.create_dataset(
            "indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 22,)
        )
        indptr = [np.zeros(1, dtype=np.int64)]
        n_counts = []
        for start in range(0, n_cells, 5_000):
            rows = min(5_000, n_cells - start)
            columns, row_ptr = distinct_genes(rows, draws)
            values = (1 + rng.poisson(mean_count[columns])).astype(np.float32)
            n_counts.append(np.add.reduceat(values.astype(np.float64), row_ptr[:-1]))
            offset = data.shape[0]
            data.resize((offset + len(values),))
            indices.resize((offset + len(values),))
            data[offset:] = values
            indices[offset:] = columns
            indptr.append(row_ptr[1:] + offset)
        group.create_dataset("indptr", data=np.concatenate(indptr))
        write_elem(
            handle,
            "obs",
            pd.DataFrame(
                {
                    "donor": pd.Categorical(rng.integers(0, 8, n_cells).astype(str)),
                    "n_counts": np.concatenate(n_counts),
                },
                index=[f"cell{i}" for i in range(n_cells)],
            ),
        )
    partial.rename(path)


# ---------------------------------------------------------------------------------------------
# One measurement per subprocess
# ---------------------------------------------------------------------------------------------


def peak_mib() -> tuple[float, float]:
    """Peak resident memory (MiB) of this process and of its largest finished child."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def process_age() -> float:
    """Seconds since this process started (Linux: /proc/self/stat field 22 against /proc/uptime)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return float(Path("/proc/uptime").read_text().split()[0]) - started


def measure(args: argparse.Namespace) -> dict:
    import anndata as ad

    from grnx_plugins.tokenizers.binned import Binned
    from grnx_plugins.tokenizers.expression_scaled import ExpressionScaled
    from grnx_plugins.tokenizers.rank_value import RankValue

    common = {"chunk_size": args.chunk_size, "n_workers": args.workers}
    tokenizer = {
        "rank_value": lambda: RankValue(model_version="V2", dictionary_dir=args.dictionaries, **common),
        "expression_scaled": lambda: ExpressionScaled(max_length=2048, **common),
        "binned": lambda: Binned(max_length=1200, **common),
    }[args.tokenizer]()
    adata = ad.read_h5ad(args.path, backed="r")
    if args.limit:
        adata = adata[: args.limit]
    tokenizer.fit(adata)  # dictionaries / gene lists only: no pass over the cells
    # Warm the compiled kernels (numba cache) outside the timing.
    small = ad.read_h5ad(args.path, backed="r")[:64]
    tokenizer.transform(small, path=Path(args.out) / "warmup")
    baseline, _ = peak_mib()
    cpu_started, started = cpu_seconds(), time.perf_counter()
    tokens = tokenizer.transform(adata, obs_columns=["donor"], path=Path(args.out) / "tokens")
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    exported = {}
    if args.dataset:  # and on to the Geneformer .dataset that Geneformer's tokenize_data writes
        from grnx_plugins.tokenizers.export import to_geneformer_dataset

        to_geneformer_dataset(tokens, Path(args.out) / "grnx.dataset", columns=["donor"])
        exported = {
            "dataset_seconds": time.perf_counter() - started,
            "dataset_cpu_seconds": cpu_seconds() - cpu_started,
        }
    own, children = peak_mib()
    return {
        **exported,
        "tokenizer": args.tokenizer,
        "cells": tokens.n_cells,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "cells_per_s": tokens.n_cells / seconds,
        "cells_per_cpu_s": tokens.n_cells / cpu,
        "tokens_per_cell": float(tokens.lengths.mean()),
        "baseline_mib": baseline,
        "peak_main_mib": own,
        "peak_worker_mib": children,
    }


def geneformer_tokenizer_class(source: str, dictionaries: Path):
    """Geneformer's ``TranscriptomeTokenizer`` from ``<source>/geneformer/tokenizer.py`` alone.

    The package's ``__init__`` imports its classifier, perturber and trainer (torch, ray, plotting
    libraries) which tokenizing does not use, so a bare package module stands in for it, holding
    the three dictionary paths ``tokenizer.py`` imports from it.
    """
    import importlib
    import types

    folder = Path(source).expanduser().resolve() / "geneformer"
    if not (folder / "tokenizer.py").exists():
        raise FileNotFoundError(
            f"{folder / 'tokenizer.py'} does not exist: GENEFORMER_SRC must be the folder that holds "
            f"Geneformer's 'geneformer' package (a clone of its repository)."
        )
    files = geneformer_dictionary_files(dictionaries)
    package = types.ModuleType("geneformer")
    package.__path__ = [str(folder)]
    # model_version="V1" reads the *_30M names: both point at the dictionaries given.
    for suffix in ("", "_30M"):
        setattr(package, f"GENE_MEDIAN_FILE{suffix}", files["gene_median_dictionary"])
        setattr(package, f"TOKEN_DICTIONARY_FILE{suffix}", files["token_dictionary"])
        setattr(package, f"ENSEMBL_MAPPING_FILE{suffix}", files.get("ensembl_mapping_dict"))
    sys.modules["geneformer"] = package
    return importlib.import_module("geneformer.tokenizer").TranscriptomeTokenizer, files


def geneformer_dictionary_files(dictionaries: Path) -> dict[str, Path]:
    """Geneformer's pickled dictionaries by kind (``token_dictionary_gc95M.pkl`` -> ``token_dictionary``)."""
    files = {p.stem.split("_gc")[0]: p for p in dictionaries.glob("*.pkl")}
    missing = {"token_dictionary", "gene_median_dictionary"} - set(files)
    if missing:
        raise FileNotFoundError(
            f"{dictionaries} lacks Geneformer's pickled {' and '.join(sorted(missing))}: its tokenizer reads "
            f"only .pkl dictionaries (../shared/data/geneformer/v2 has them)."
        )
    return files


def measure_geneformer(args: argparse.Namespace) -> dict:
    """Geneformer's ``tokenize_data``: a folder holding the h5ad -> a ``.dataset`` on disk."""
    import inspect

    try:
        tokenizer_class, files = geneformer_tokenizer_class(args.geneformer, Path(args.dictionaries))
    except ModuleNotFoundError as missing:
        raise SystemExit(
            f"Geneformer's tokenizer imports '{missing.name}', which is not installed here "
            f"(pip install {missing.name})."
        ) from None
    if "model_version" not in inspect.signature(tokenizer_class).parameters:
        raise SystemExit(
            "This Geneformer tokenizer predates the V2 models (no 'model_version' argument); point "
            "GENEFORMER_SRC at a checkout from September 2024 or later."
        )
    tokenizer = tokenizer_class(
        {"donor": "donor"},
        nproc=args.geneformer_nproc,
        model_version="V2",
        gene_median_file=files["gene_median_dictionary"],
        token_dictionary_file=files["token_dictionary"],
        gene_mapping_file=files.get("ensembl_mapping_dict"),
    )
    folder = Path(args.out) / "input"
    folder.mkdir()
    (folder / "cells.h5ad").symlink_to(Path(args.path).resolve())
    baseline, _ = peak_mib()
    cpu_started, started = cpu_seconds(), time.perf_counter()
    tokenizer.tokenize_data(folder, args.out, "geneformer", file_format="h5ad")
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    # The whole process (python, imports, dictionaries, tokenize_data), as `grnx run` is measured.
    whole_seconds, whole_cpu = process_age(), cpu_seconds()
    own, children = peak_mib()
    import datasets

    written = datasets.load_from_disk(str(Path(args.out) / "geneformer.dataset"))
    return {
        "tokenizer": "Geneformer tokenize_data",
        "cells": written.num_rows,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "process_seconds": whole_seconds,
        "process_cpu_seconds": whole_cpu,
        "cells_per_s": written.num_rows / seconds,
        "cells_per_cpu_s": written.num_rows / cpu,
        "tokens_per_cell": float(np.mean(written.data.column("length").to_numpy())),
        "baseline_mib": baseline,
        "peak_main_mib": own,
        "peak_worker_mib": children,
    }


def run_measurement(
    path: Path,
    dictionaries: Path,
    tokenizer: str,
    workers: int,
    chunk_size: int,
    limit: int | None,
    scratch: Path,
    extra: list[str] = (),
    keep_output: bool = False,
) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"{tokenizer}-", dir=scratch))
    command = (
        [
            sys.executable,
            __file__,
            "--worker",
            "--path",
            str(path),
            "--dictionaries",
            str(dictionaries),
            "--tokenizer",
            tokenizer,
            "--workers",
            str(workers),
            "--chunk-size",
            str(chunk_size),
            "--out",
            str(out),
        ]
        + (["--limit", str(limit)] if limit else [])
        + list(extra)
    )
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if not keep_output:
        subprocess.run(["rm", "-rf", str(out)], check=False)
    if result.returncode != 0:
        who = "Geneformer" if "--geneformer" in extra else tokenizer
        raise SystemExit(f"{who} failed:\n{result.stderr.strip()[-3000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "out": str(out)}


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


def load_reference_inputs(path: Path, dictionaries: Path, n_cells: int):
    import anndata as ad

    from grnx_plugins.tokenizers.rank_value import RankValue

    tokenizer = RankValue(model_version="V2", dictionary_dir=str(dictionaries))
    loaded = tokenizer._dictionaries()
    backed = ad.read_h5ad(path, backed="r")
    counts = backed.X[:n_cells]
    ids = backed.var["ensembl_id"] if "ensembl_id" in backed.var.columns else backed.var_names
    genes = [str(g) for g in ids]
    backed.file.close()
    return tokenizer, loaded, counts, genes


def geneformer_style(counts, genes, loaded, model_input_size: int = 4096) -> tuple[list[np.ndarray], float]:
    """Geneformer's tokenize_anndata loop: chunk of 512 -> X / n_counts * 1e4 / medians -> per-cell
    argsort. (Its Ensembl-id collapsing step, which loads the whole file, is left out.)"""
    import scipy.sparse as sp

    tokens, medians, mapping = loaded["tokens"], loaded["medians"], loaded["mapping"]
    started = time.perf_counter()
    mapped = [mapping.get(g.upper()) if mapping else g.upper() for g in genes]
    location = np.array([i for i, g in enumerate(mapped) if g in tokens and not g.startswith("<")])
    norm_factor = np.array([medians[mapped[i]] for i in location])
    gene_tokens = np.array([tokens[mapped[i]] for i in location])
    n_counts = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()[:, None]  # as obs["n_counts"]
    out = []
    for start in range(0, counts.shape[0], 512):
        view = counts[start : start + 512][:, location]
        normalised = sp.csr_matrix(view / n_counts[start : start + 512] * 10_000 / norm_factor)
        for i in range(normalised.shape[0]):
            row = normalised[i]
            ranked = gene_tokens[row.indices][np.argsort(-row.data)]
            out.append(np.concatenate([[tokens["<cls>"]], ranked[: model_input_size - 2], [tokens["<eos>"]]]))
    return out, time.perf_counter() - started


def naive(counts, genes, loaded, model_input_size: int = 4096) -> tuple[list[list[int]], float]:
    """One cell, one gene at a time, in plain Python."""
    tokens, medians, mapping = loaded["tokens"], loaded["medians"], loaded["mapping"]
    started = time.perf_counter()
    out = []
    for i in range(counts.shape[0]):
        row = counts[i]
        total = float(row.data.sum())
        summed: dict[str, float] = {}
        for j, x in zip(row.indices.tolist(), row.data.tolist()):
            gene = mapping.get(genes[j].upper()) if mapping else genes[j].upper()
            if gene in tokens and gene in medians:
                summed[gene] = summed.get(gene, 0.0) + x
        ranked = sorted(summed, key=lambda g: -(summed[g] / total * 10_000 / medians[g]))
        out.append(
            [tokens["<cls>"]] + [tokens[g] for g in ranked[: model_input_size - 2]] + [tokens["<eos>"]]
        )
    return out, time.perf_counter() - started


def agreement(ours, theirs, counts, genes, loaded) -> tuple[int, int]:
    """(cells identical, cells identical after ordering tied values the same way)."""
    identical = equal_outside_ties = 0
    tokens, medians, mapping = loaded["tokens"], loaded["medians"], loaded["mapping"]
    id_to_gene = {v: k for k, v in tokens.items()}
    for i, (a, b) in enumerate(zip(ours, theirs)):
        a, b = np.asarray(a), np.asarray(b)
        if np.array_equal(a, b):
            identical += 1
            equal_outside_ties += 1
            continue
        row = counts[i]
        total = row.data.sum()
        value = {}
        for j, x in zip(row.indices, row.data):
            gene = mapping.get(genes[j].upper()) if mapping else genes[j].upper()
            if gene in tokens:
                value[tokens[gene]] = value.get(tokens[gene], 0) + x
        scaled = {t: v / total * 10_000 / medians[id_to_gene[t]] for t, v in value.items()}
        va = np.array([scaled.get(t, -1) for t in a[1:-1]])
        vb = np.array([scaled.get(t, -1) for t in b[1:-1]])
        if len(a) == len(b) and np.array_equal(va, vb):
            equal_outside_ties += 1
    return identical, equal_outside_ties


def read_dataset_tokens(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(offsets, flat input_ids, donor column) of a ``datasets`` folder, without Python lists."""
    import datasets

    table = datasets.load_from_disk(str(path)).data.table
    ids = table.column("input_ids").combine_chunks()
    offsets = np.asarray(ids.offsets, dtype=np.int64)
    flat = ids.values.to_numpy()
    if offsets[0] != 0:  # a sliced array: rebase
        flat, offsets = flat[offsets[0] : offsets[-1]], offsets - offsets[0]
    return offsets, flat, [str(d) for d in table.column("donor").to_pylist()]


def compare_token_sets(
    h5ad: Path, dictionaries: Path, ours: tuple[np.ndarray, np.ndarray], theirs: tuple[np.ndarray, np.ndarray]
) -> tuple[list[int], int]:
    """Cells whose token ids differ between two (offsets, ids) sets of the same cells, and how many
    of those are identical outside runs of tied values (checked against the h5ad's counts)."""
    import anndata as ad

    (our_offsets, our_ids), (their_offsets, their_ids) = ours, theirs
    differing = [
        i
        for i in range(len(our_offsets) - 1)
        if not np.array_equal(
            our_ids[our_offsets[i] : our_offsets[i + 1]],
            their_ids[their_offsets[i] : their_offsets[i + 1]],
        )
    ]
    outside = 0
    if differing:
        _, loaded, _, genes = load_reference_inputs(h5ad, dictionaries, 0)
        backed = ad.read_h5ad(h5ad, backed="r")
        counts = backed.X[np.asarray(differing)]
        backed.file.close()
        _, outside = agreement(
            [our_ids[our_offsets[i] : our_offsets[i + 1]] for i in differing],
            [their_ids[their_offsets[i] : their_offsets[i + 1]] for i in differing],
            counts,
            genes,
            loaded,
        )
    return differing, outside


def compare_with_geneformer(
    source: str, path: Path, dictionaries: Path, args: argparse.Namespace, scratch: Path
) -> None:
    """Geneformer's ``tokenize_data`` and grnx ``rank_value`` + ``.dataset`` export, same h5ad, same
    number of processes; prints both, the speed ratio, and how far the two ``.dataset`` agree."""
    import anndata as ad

    if not (Path(source).expanduser() / "geneformer" / "tokenizer.py").exists():
        print(
            f"\nGeneformer's own tokenizer: not run: GENEFORMER_SRC={source} has no geneformer/tokenizer.py "
            f"(it must be the folder holding Geneformer's 'geneformer' package, a clone of its repository)."
        )
        return
    backed = ad.read_h5ad(path, backed="r")
    n_cells = backed.n_obs
    cells = min(args.geneformer_cells or n_cells, n_cells)
    if cells < n_cells:
        subset_path = scratch / f"first_{cells}_{path.name}"
        if not subset_path.exists():
            backed[:cells].to_memory().write_h5ad(subset_path)
        path = subset_path
    backed.file.close()
    print(
        f"\nGeneformer's own tokenizer (GENEFORMER_SRC={source}) against grnx, {cells:,} cells, "
        f"grnx with {args.workers} worker process(es), Geneformer with nproc={args.geneformer_nproc}:"
    )

    def both_write_a_dataset(extra: list[str]) -> dict:
        common = (path, dictionaries, "rank_value", args.workers, args.chunk_size, None, scratch)
        return run_measurement(*common, extra=extra, keep_output=True)

    ours = both_write_a_dataset(["--dataset"])
    try:
        theirs = both_write_a_dataset(
            ["--geneformer", source, "--geneformer-nproc", str(args.geneformer_nproc)]
        )
    except SystemExit as error:  # report, do not hide, a Geneformer that does not run
        print(f"  {error}")
        subprocess.run(["rm", "-rf", ours["out"]], check=False)
        return
    n = theirs["cells"]
    lines = (
        ("Geneformer tokenize_data", "h5ad -> .dataset", theirs["seconds"], theirs["cpu_seconds"]),
        ("grnx rank_value", "h5ad -> grnx tokens", ours["seconds"], ours["cpu_seconds"]),
        (
            "grnx rank_value + export",
            "h5ad -> .dataset",
            ours["dataset_seconds"],
            ours["dataset_cpu_seconds"],
        ),
    )
    print(f"  {'':<26}{'output':<21}{'wall s':>8}{'cells/s':>9}{'CPU s':>8}{'grnx faster':>13}")
    for label, output, seconds, cpu in lines:
        ratio = "" if label.startswith("Geneformer") else f"{theirs['seconds'] / seconds:.1f}x"
        print(f"  {label:<26}{output:<21}{seconds:>8.1f}{n / seconds:>9,.0f}{cpu:>8.1f}{ratio:>13}")
    print(
        f"  peak memory: Geneformer {theirs['peak_main_mib']:,.0f} MiB (child processes "
        f"{theirs['peak_worker_mib']:,.0f}); grnx {ours['peak_main_mib']:,.0f} MiB (workers "
        f"{ours['peak_worker_mib']:,.0f})"
    )
    ratio = theirs["seconds"] / ours["seconds"]
    print(
        f"  target (grnx >= 20x Geneformer's tokenizer, each writing its own output): "
        f"{'met' if ratio >= 20 else 'NOT met'} at {ratio:.1f}x"
        + ("" if n >= 200_000 else " (the target is set for >= 200,000 cells; fixed costs weigh more here)")
    )

    our_offsets, our_ids, our_donors = read_dataset_tokens(Path(ours["out"]) / "grnx.dataset")
    their_offsets, their_ids, their_donors = read_dataset_tokens(Path(theirs["out"]) / "geneformer.dataset")
    if len(our_offsets) != len(their_offsets):
        print(
            f"  outputs DISAGREE: {len(our_offsets) - 1:,} cells from grnx, {len(their_offsets) - 1:,} from Geneformer"
        )
    else:
        differing, outside = compare_token_sets(
            path, dictionaries, (our_offsets, our_ids), (their_offsets, their_ids)
        )
        n = len(our_offsets) - 1
        print(
            f"  outputs: cells identical {n - len(differing):,}/{n:,}, equal outside tied values "
            f"{n - len(differing) + outside:,}/{n:,}; donor column "
            f"{'identical' if our_donors == their_donors else 'DIFFERS'}"
        )
    for row in (ours, theirs):
        subprocess.run(["rm", "-rf", row["out"]], check=False)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="20,000 cells")
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--nnz", type=int, default=2_000, help="non-zero genes per cell (about)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--tokenizers", nargs="*", default=list(TOKENIZERS), choices=TOKENIZERS)
    parser.add_argument("--reference-cells", type=int, default=2_000)
    parser.add_argument(
        "--geneformer-cells",
        type=int,
        default=None,
        help="cells for the GENEFORMER_SRC comparison (default: all; Geneformer holds them all in memory)",
    )
    parser.add_argument(
        "--scratch", default=None, help="folder for the h5ad and outputs (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated h5ad for the next run")
    # Internal: one measurement.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--dictionaries", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--geneformer-nproc",
        type=int,
        default=1,
        help="Geneformer's nproc (its datasets.map processes; its ranking loop is single-threaded "
        "either way). 2 fails at 200k cells on a 24 GiB machine: each map worker gets a pickled copy "
        "of the in-memory dataset",
    )
    parser.add_argument("--dataset", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--geneformer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure_geneformer(args) if args.geneformer else measure(args)))
        return

    n_cells = 20_000 if args.quick else args.cells
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="grnx-bench-tokenizers-"))
    scratch.mkdir(parents=True, exist_ok=True)
    genes, dictionaries = dictionary_genes(
        DEFAULT_DICTIONARIES if DEFAULT_DICTIONARIES.exists() else None, args.genes, scratch / "dictionaries"
    )
    path = scratch / f"cells_{n_cells}x{len(genes)}_{args.nnz}.h5ad"
    if not path.exists():
        started = time.perf_counter()
        write_counts_h5ad(path, genes, n_cells, args.nnz)
        print(
            f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - started:.0f} s"
        )
    load = os.getloadavg()
    print(
        f"{n_cells:,} cells x {len(genes):,} genes, ~{args.nnz:,} non-zeros per cell; dictionaries: "
        f"{dictionaries}; {args.workers} worker(s), chunks of {args.chunk_size}; CPUs: {os.cpu_count()}, "
        f"load average {load[0]:.1f}"
    )

    rows = []
    for name in args.tokenizers:
        rows.append(run_measurement(path, dictionaries, name, args.workers, args.chunk_size, None, scratch))
        if name == "rank_value":
            rows.append(
                {
                    **run_measurement(
                        path, dictionaries, name, args.workers, args.chunk_size, n_cells // 4, scratch
                    ),
                    "tokenizer": "rank_value (1/4 of cells)",
                }
            )
            if args.workers != 1:
                rows.append(
                    {
                        **run_measurement(
                            path, dictionaries, name, 1, args.chunk_size, n_cells // 4, scratch
                        ),
                        "tokenizer": "rank_value (1/4, 1 process)",
                    }
                )
    print(
        f"\n{'tokenizer':<30}{'cells':>9}{'wall s':>8}{'cells/s':>9}{'CPU s':>8}{'cells/CPU-s':>12}"
        f"{'tokens/cell':>12}{'main MiB (before)':>19}{'worker MiB':>11}"
    )
    for row in rows:
        print(
            f"{row['tokenizer']:<30}{row['cells']:>9,}{row['seconds']:>8.1f}{row['cells_per_s']:>9,.0f}"
            f"{row['cpu_seconds']:>8.1f}{row['cells_per_cpu_s']:>12,.0f}{row['tokens_per_cell']:>12.0f}"
            f"{row['peak_main_mib']:>11.0f} ({row['baseline_mib']:>4.0f}){row['peak_worker_mib']:>11.0f}"
        )
    print(
        "cells/s is wall-clock on this machine as loaded now; cells/CPU-s x cores is the rate on idle cores."
    )

    if "rank_value" in args.tokenizers:
        grnx_rate = rows[0]["cells_per_s"]
        tokenizer, loaded, counts, gene_ids = load_reference_inputs(path, dictionaries, args.reference_cells)
        import anndata as ad
        import pandas as pd

        # The references take each cell's total as its row sum (the writer's obs["n_counts"]).
        totals = pd.DataFrame({"n_counts": np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()})
        ours_tokens = tokenizer.transform(
            ad.AnnData(
                counts, obs=totals.set_axis(totals.index.astype(str)), var=pd.DataFrame(index=gene_ids)
            )
        )
        ours = [ours_tokens.cell(i)[0] for i in range(ours_tokens.n_cells)]
        print(f"\nrank_value references on the first {counts.shape[0]:,} cells (one process each):")
        style, style_seconds = geneformer_style(counts, gene_ids, loaded)
        plain, plain_seconds = naive(counts, gene_ids, loaded)
        for label, theirs, seconds in (
            ("geneformer-style numpy loop", style, style_seconds),
            ("naive per-cell python loop", plain, plain_seconds),
        ):
            rate = counts.shape[0] / seconds
            identical, outside = agreement(ours, theirs, counts, gene_ids, loaded)
            print(
                f"  {label:<30} {rate:>9,.0f} cells/s   grnx rank_value ({args.workers} workers) / it: "
                f"{grnx_rate / rate:>6.1f}x   cells identical {identical}/{len(ours)}, "
                f"equal outside ties {outside}/{len(ours)}"
            )
    source = os.environ.get("GENEFORMER_SRC")
    if "rank_value" in args.tokenizers and source:
        compare_with_geneformer(source, path, dictionaries, args, scratch)
    elif "rank_value" in args.tokenizers:
        print(
            "\nGeneformer's own tokenizer: not run (set GENEFORMER_SRC to a clone of Geneformer's repository)."
        )
    if not args.keep and args.scratch is None:
        subprocess.run(["rm", "-rf", str(scratch)], check=False)


if __name__ == "__main__":
    main()
