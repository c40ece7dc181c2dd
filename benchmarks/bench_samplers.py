"""Diversity samplers side by side: rare-state recovery, effective sample size, Hausdorff distance, cost.

Samplers: uniform; WDS in the paper's setting (softmax of 1/K, log1p values, R = 200) and in
sharp settings (density on counts with I ∝ K^-a; a sharpened kernel J^p); geometric sketching
(geosketch), scSampler and kernel herding (sketchKH). Datasets, each with a planted rare state:

- ``synthetic``: the grnx synthetic source with three cell groups (group_effect 1.5, so groups
  differ), one of them subsampled to ``--rare-share`` of the cells (the source plants no rare
  state itself);
- ``kang2018``: Kang et al. 2018 PBMC from ../shared/data when present: every control cell and
  IFN-beta-stimulated cells subsampled to ``--rare-share`` (a real, distinct state made rare).

X is log1p of counts normalised to 10,000 per cell, ``layers["counts"]`` the counts, and
``obsm["X_pca"]`` the samplers' fallback PCA (50 components), computed once and shared by the
geometric samplers and the Hausdorff distance. Each sampler draws ``--fraction`` of the cells
``--repeats`` times (seeds 0..); reported: rare-state recovery (share of rare cells in the sample
over their share in the data; 1 = uniform in expectation) as mean ± sd over repeats, the number of
repeats that drew no rare cell, the effective sample size of the sampling distribution
(``1 / sum I^2`` over all cells, WDS) as a share of n, the directed Hausdorff distance from all cells
to the sample in PCA space, wall and CPU seconds per draw, and the peak of memory allocated through
Python/numpy during a draw (tracemalloc; numba's own allocations are not seen).

    python benchmarks/bench_samplers.py            # synthetic 10,000 cells + Kang, 5 repeats
    python benchmarks/bench_samplers.py --quick    # synthetic 3,000 cells + Kang, 2 repeats
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GRNX_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def with_rare_state(counts, labels: np.ndarray, rare_label: str, rare_share: float, seed: int):
    """Keep every cell outside ``rare_label`` and just enough of it to make up ``rare_share``."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    others = np.flatnonzero(labels != rare_label)
    members = np.flatnonzero(labels == rare_label)
    n_rare = max(1, round(rare_share * others.size / (1 - rare_share)))
    if n_rare > members.size:
        raise SystemExit(f"only {members.size} {rare_label!r} cells; cannot plant {n_rare}")
    keep = np.sort(np.concatenate([others, rng.choice(members, n_rare, replace=False)]))
    matrix = sp.csr_matrix(counts[keep], dtype=np.float32)
    matrix = matrix[np.asarray(matrix.sum(axis=1)).ravel() > 0]
    obs = pd.DataFrame({"state": np.where(labels[keep] == rare_label, "rare", labels[keep])})
    obs.index = [f"cell{i}" for i in range(len(obs))]
    adata = ad.AnnData(X=matrix.copy(), obs=obs, layers={"counts": matrix})
    return adata


def prepare(adata):
    """X = log1p(counts normalised to 1e4), obsm["X_pca"] = the samplers' fallback PCA."""
    import scanpy as sc

    from grnx_plugins.samplers._embedding import pca_coordinates

    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.obsm["X_pca"] = pca_coordinates(adata, "X_pca", 50, "bench")
    return adata


def synthetic_data(n_cells: int, rare_share: float):
    from grnx_plugins.data.synthetic import Synthetic

    source = Synthetic(n_cells=n_cells, n_genes=500, n_regulators=60, n_groups=3, group_effect=1.5, seed=0)
    full = source.load()
    labels = full.obs["cell_type"].astype(str).to_numpy()
    rarest = full.obs["cell_type"].astype(str).value_counts().idxmin()
    return prepare(with_rare_state(full.layers["counts"], labels, rarest, rare_share, seed=1))


def kang_data(rare_share: float):
    import pandas as pd
    import scipy.io
    import scipy.sparse as sp

    folder = SHARED_DATA / "scrna" / "kang2018_pbmc_ifnb"
    if not (folder / "matrix.mtx.gz").is_file():
        return None
    with gzip.open(folder / "matrix.mtx.gz", "rb") as handle:
        counts = sp.csr_matrix(scipy.io.mmread(handle).T)
    condition = pd.read_csv(folder / "cell_metadata.tsv", sep="\t")["condition"].to_numpy()
    return prepare(with_rare_state(counts, condition, "STIM", rare_share, seed=1))


def samplers(fraction: float):
    from grnx_plugins.samplers.geosketch import GeometricSketchSampler
    from grnx_plugins.samplers.kernel_herding import KernelHerdingSampler
    from grnx_plugins.samplers.scsampler import ScSampler
    from grnx_plugins.samplers.uniform import UniformSampler
    from grnx_plugins.samplers.wds import WeightedDiversifiedSampler as Wds

    return [
        ("uniform", UniformSampler(fraction=fraction)),
        ("wds paper (softmax 1/K, log1p)", Wds(fraction=fraction, n_hashes=200)),
        ("wds softmax T=0.05, log1p", Wds(fraction=fraction, n_hashes=200, temperature=0.05)),
        (
            "wds counts, K^-1",
            Wds(fraction=fraction, n_hashes=200, layer="counts", weighting="inverse_power", power=1.0),
        ),
        (
            "wds counts, K^-2",
            Wds(fraction=fraction, n_hashes=200, layer="counts", weighting="inverse_power", power=2.0),
        ),
        (
            "wds counts, J^2 kernel, K^-1",
            Wds(
                fraction=fraction,
                n_hashes=200,
                layer="counts",
                kernel_power=2,
                n_buckets=1 << 17,
                weighting="inverse_power",
                power=1.0,
            ),
        ),
        ("geosketch", GeometricSketchSampler(fraction=fraction)),
        ("scsampler", ScSampler(fraction=fraction)),
        ("kernel_herding gamma=1", KernelHerdingSampler(fraction=fraction)),
        ("kernel_herding gamma=10", KernelHerdingSampler(fraction=fraction, gamma=10.0)),
    ]


def measure(adata, sampler, repeats: int) -> dict[str, float]:
    from grnx_plugins.samplers import _metrics

    is_rare = (adata.obs["state"] == "rare").to_numpy()
    coordinates = adata.obsm["X_pca"]
    recoveries, missed, hausdorff, wall, cpu, peak, ess = [], 0, [], [], [], [], []
    for seed in range(repeats):
        view = adata.copy() if sampler.name == "wds" else adata  # WDS writes obs columns
        tracemalloc.start()
        started, started_cpu = time.perf_counter(), time.process_time()
        sample = sampler.sample(view, np.random.default_rng(seed))
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
        peak.append(tracemalloc.get_traced_memory()[1] / 2**20)
        tracemalloc.stop()
        recoveries.append(_metrics.recovery(is_rare, sample.indices))
        missed += int(not is_rare[sample.indices].any())
        hausdorff.append(_metrics.directed_hausdorff_to_sample(coordinates, sample.indices)[0])
        # ESS of the sampling distribution over all cells: 1/sum(I^2) for WDS, n for the others.
        ess.append(sample.info.get("effective_sample_size", adata.n_obs) / adata.n_obs)
    return {
        "recovery": float(np.mean(recoveries)),
        "recovery_sd": float(np.std(recoveries, ddof=1)) if repeats > 1 else float("nan"),
        "missed": missed,
        "ess": float(np.mean(ess)),
        "max_over_min": float(sample.info.get("weight_max_over_min", 1.0)),
        "hausdorff": float(np.mean(hausdorff)),
        "wall": float(np.median(wall)),
        "cpu": float(np.median(cpu)),
        "peak_mb": float(max(peak)),
    }


def report(name: str, adata, fraction: float, repeats: int) -> None:
    n_rare = int((adata.obs["state"] == "rare").sum())
    n_draw = round(fraction * adata.n_obs)
    print(
        f"\n## {name}: {adata.n_obs} cells x {adata.n_vars} genes, {n_rare} rare cells "
        f"({n_rare / adata.n_obs:.1%}); {fraction:.0%} samples ({n_draw} cells, {n_draw * n_rare / adata.n_obs:.1f} "
        f"rare expected under uniform), {repeats} repeats"
    )
    print(
        f"{'sampler':<32} {'rare recovery':>15} {'no rare':>8} {'ESS/n':>7} {'Imax/Imin':>10} "
        f"{'Hausdorff':>10} {'wall s':>8} {'CPU s':>8} {'peak MiB':>9}"
    )
    for label, sampler in samplers(fraction):
        row = measure(adata, sampler, repeats)
        print(
            f"{label:<32} {row['recovery']:>7.2f} ± {row['recovery_sd']:<5.2f} {row['missed']:>5}/{repeats:<2} "
            f"{row['ess']:>7.3f} {row['max_over_min']:>10.1f} {row['hausdorff']:>10.2f} {row['wall']:>8.2f} "
            f"{row['cpu']:>8.2f} {row['peak_mb']:>9.1f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cells", type=int, default=10_000, help="synthetic cells before planting")
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rare-share", type=float, default=0.015)
    parser.add_argument("--quick", action="store_true", help="3,000 synthetic cells, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.cells, args.repeats = 3000, 2

    import numba

    print(f"numba threads: {numba.get_num_threads()}; CPU cores: {os.cpu_count()}")
    # Compile the numba kernels (WDS, kernel herding) outside the timings.
    warm = synthetic_data(600, 0.05)
    for _, sampler in samplers(0.05):
        sampler.sample(warm.copy(), np.random.default_rng(0))

    report("synthetic", synthetic_data(args.cells, args.rare_share), args.fraction, args.repeats)
    kang = kang_data(args.rare_share)
    if kang is None:
        print(f"\nKang 2018 not found under {SHARED_DATA}; skipped")
    else:
        report("kang2018 (STIM cells made rare)", kang, args.fraction, max(args.repeats, 5))


if __name__ == "__main__":
    sys.exit(main())
