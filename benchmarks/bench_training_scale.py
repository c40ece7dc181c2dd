"""Training throughput and peak memory with gradient checkpointing and accumulation, on CPU.

For geneformer (V1 size: 6 layers, hidden 256, 4 heads, intermediate 512; ``--v2`` adds the V2-104M
size), celluformer (paper size) and scgpt (4 layers of d 256), at 256 / 1,024 / 2,048 tokens per
cell, one epoch of the shared training loop is timed in four settings: plain; gradient
checkpointing; gradient accumulation (``--accumulation`` pieces of batch/accumulation cells, the
same cells per optimiser step); both. "peak MB" is the measuring subprocess's ``ru_maxrss``, "+MB"
its growth over the footprint after imports and data creation (model, optimiser, activations).
Checkpointing trades recomputation (~1 extra forward) for activation memory; accumulation divides
the activation memory of a step by the number of pieces at the same effective batch.

Usage:  python benchmarks/bench_training_scale.py --quick   (tiny models, 64 / 128 tokens; a minute)
        python benchmarks/bench_training_scale.py           (256 1024 2048; long on one CPU core)
        python benchmarks/bench_training_scale.py --models geneformer --lengths 2048 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import SIZES, make_tokens, rss_mb  # noqa: E402

V2 = {"architecture": "v2-104m"}
SETTINGS = {
    "plain": {"checkpointing": False, "accumulate": False},
    "ckpt": {"checkpointing": True, "accumulate": False},
    "accum": {"checkpointing": False, "accumulate": True},
    "ckpt+accum": {"checkpointing": True, "accumulate": True},
}


def worker(spec: dict) -> dict:
    import torch

    from grnx_core import DataRoles, RunContext
    from grnx_core.registry import default_registry

    torch.set_num_threads(spec["threads"])
    name, length = spec["model"], spec["length"]
    cls = default_registry().get("model", "geneformer" if name == "geneformer-v2" else name)
    params = dict(V2 if name == "geneformer-v2" else SIZES[spec["size"]][name])
    if name.startswith("geneformer") and length > 2048:
        params["max_positions"] = length
    setting = SETTINGS[spec["setting"]]
    pieces = spec["accumulation"] if setting["accumulate"] else 1
    train = SimpleNamespace(
        epochs=1,
        batch_size=max(1, spec["batch_size"] // pieces),
        gradient_accumulation_steps=pieces,
        gradient_checkpointing=setting["checkpointing"],
        precision=spec["precision"],
        learning_rate=1e-4,
        validation_fraction=0.0,
        device="cpu",
    )
    tokens = make_tokens(name.split("-")[0], spec["n_cells"], length)
    context = RunContext(roles=DataRoles(label_key="label"), tokens=tokens, train_settings=train)
    # import what fit imports first, so the timing is of training only
    import accelerate  # noqa: F401
    import transformers  # noqa: F401
    from transformers import BertForSequenceClassification, get_scheduler  # noqa: F401

    baseline = rss_mb()
    started = time.perf_counter()
    cls(**params).fit(context)
    seconds = time.perf_counter() - started
    peak = rss_mb()
    return {"cells_per_s": spec["n_cells"] / seconds, "peak_mb": peak, "growth_mb": peak - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 64 and 128 tokens")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="tokens per cell")
    parser.add_argument("--models", nargs="+", default=["geneformer", "celluformer", "scgpt"])
    parser.add_argument("--v2", action="store_true", help="also geneformer at the V2-104M size")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--batch-size", type=int, default=8, help="cells per optimiser step")
    parser.add_argument("--accumulation", type=int, default=4, help="pieces per step when accumulating")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    size = "quick" if args.quick else "default"
    lengths = args.lengths or ([64, 128] if args.quick else [256, 1024, 2048])
    models = list(args.models) + (["geneformer-v2"] if args.v2 else [])
    print(
        f"grnx training at scale ({size} sizes, CPU, {args.threads} thread(s), {args.batch_size} cells "
        f"per step, accumulation {args.accumulation}, {args.precision})"
    )
    header = f"{'model':<15}{'L':>6}{'setting':>12}{'cells/s':>10}{'peak MB':>10}{'+MB':>8}"
    print(header)
    print("-" * len(header))
    for name in models:
        for length in lengths:
            n_cells = 16 if args.quick else max(args.batch_size, min(32, 16384 // length))
            for setting in args.settings:
                spec = {
                    "model": name,
                    "length": length,
                    "n_cells": n_cells,
                    "batch_size": args.batch_size,
                    "accumulation": args.accumulation,
                    "setting": setting,
                    "precision": args.precision,
                    "size": size,
                    "threads": args.threads,
                }
                completed = subprocess.run(
                    [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True
                )
                if completed.returncode != 0:
                    reason = (completed.stderr.strip().splitlines() or ["no output"])[-1]
                    print(f"{name:<15}{length:>6}{setting:>12}  failed: {reason}")
                    continue
                r = json.loads(completed.stdout.strip().splitlines()[-1])
                print(
                    f"{name:<15}{length:>6}{setting:>12}{r['cells_per_s']:>10.2f}{r['peak_mb']:>10.0f}"
                    f"{r['growth_mb']:>8.0f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
