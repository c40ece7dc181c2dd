"""Training throughput, peak memory and attention-extraction cost of grnx's models on CPU.

For each model (celluformer, geneformer, scgpt, mlp) and sequence length (256, 1024, 2048 tokens per
cell; the MLP reads that many genes), one epoch of the shared training loop is timed on synthetic
cells (small batches), and for the transformers the attention API (per-cell maps averaged over all
layers and heads, computed layer by layer) is timed against a plain forward pass over the same cells
(``predict_proba``). Target: attention extraction costs at most 1.5x the forward pass. "extract
cells/s" adds the attention extractor's weighted Z/M aggregation over the genes of those cells.

Each measurement runs in its own subprocess so that ``ru_maxrss`` (peak resident memory) belongs to
it alone; "peak MB" is the subprocess peak, "+MB" its growth over the footprint after imports and
data creation (what the model and its activations took).

Model sizes (default): CelluFormer paper settings (d_model 128, 4 blocks, 8 heads, ff 512); Geneformer
V1 (6 layers, hidden 256, 4 heads, intermediate 512); scGPT reduced to 4 layers of d 256 (the
whole-human 12 x 512 takes minutes per cell on one CPU core); MLP hidden (128, 64). Dropout is 0.1
for CelluFormer (paper) and the models' defaults otherwise.

Usage:  python benchmarks/bench_models.py            (lengths 256 1024 2048)
        python benchmarks/bench_models.py --quick    (tiny models, lengths 64 128; seconds)
        python benchmarks/bench_models.py --lengths 256 --models celluformer geneformer --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd

N_GENES = 5000

SIZES = {
    "default": {
        "celluformer": {"d_model": 128, "n_layers": 4, "n_heads": 8, "d_ff": 512, "dropout": 0.1},
        "geneformer": {"architecture": "v1"},
        "scgpt": {"d_model": 256, "n_layers": 4, "n_heads": 8, "d_ff": 256, "dropout": 0.2},
        "mlp": {"hidden_sizes": [128, 64], "dropout": 0.1},
    },
    "quick": {
        "celluformer": {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "dropout": 0.1},
        "geneformer": {
            "architecture": "v1",
            "n_layers": 2,
            "hidden_size": 32,
            "n_heads": 4,
            "intermediate_size": 64,
        },
        "scgpt": {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "dropout": 0.2},
        "mlp": {"hidden_sizes": [128, 64], "dropout": 0.1},
    },
}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_tokens(model: str, n_cells: int, length: int, seed: int = 0):
    """Cells of exactly ``length`` tokens in the layout each model's tokenizer produces."""
    from grnx_core import TokenizedCells

    rng = np.random.default_rng(seed)
    if model == "geneformer":  # rank-value V1: <pad>=0, <mask>=1, genes
        specials, prefix = ["<pad>", "<mask>"], []
    elif model == "scgpt":  # binned: <pad>, <cls> first in the cell
        specials, prefix = ["<pad>", "<cls>"], [1]
    else:  # expression_scaled: <pad>, genes
        specials, prefix = ["<pad>"], []
    vocabulary = specials + [f"G{i}" for i in range(N_GENES)]
    n_body = length - len(prefix)
    ids = np.concatenate(
        [
            np.r_[prefix, rng.choice(np.arange(len(specials), len(vocabulary)), n_body, replace=False)]
            for _ in range(n_cells)
        ]
    )
    if model == "geneformer":
        values = None
    elif model == "scgpt":
        values = np.tile(np.r_[[0.0] * len(prefix), np.ones(n_body)], n_cells)
        values[values > 0] = rng.integers(1, 51, int((values > 0).sum()))
    else:
        values = rng.gamma(2.0, 1.0, len(ids))
    labels = np.where(np.arange(n_cells) % 2 == 0, "case", "control")
    metadata = {"pad_id": 0, "pad_value": -2.0 if model == "scgpt" else 0.0, "vocab_size": len(vocabulary)}
    return TokenizedCells(
        input_ids=ids,
        offsets=np.arange(n_cells + 1) * length,
        obs=pd.DataFrame({"label": labels}, index=[f"c{i}" for i in range(n_cells)]),
        values=values,
        vocabulary=vocabulary,
        metadata=metadata,
    )


def make_adata(n_cells: int, n_genes: int):
    import anndata as ad

    rng = np.random.default_rng(0)
    x = rng.poisson(1.0, (n_cells, n_genes)).astype(np.float32)
    labels = np.where(np.arange(n_cells) % 2 == 0, "case", "control")
    return ad.AnnData(
        X=x,
        obs=pd.DataFrame({"label": labels}, index=[f"c{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]),
    )


def worker(spec: dict) -> dict:
    """One measurement: train one epoch, then (transformers) attention vs forward timing."""
    import torch

    from grnx_core import DataRoles, RunContext
    from grnx_core.registry import default_registry

    torch.set_num_threads(spec["threads"])
    name, length, n_cells, batch = spec["model"], spec["length"], spec["n_cells"], spec["batch_size"]
    cls = default_registry().get("model", name)
    params = dict(SIZES[spec["size"]][name])
    if name == "geneformer" and length > 2048:
        params["max_positions"] = length
    train = SimpleNamespace(
        epochs=1,
        batch_size=batch,
        learning_rate=1e-4,
        validation_fraction=0.0,
        device="cpu",
        optimizer="adam",
        max_grad_norm=1.0,
    )
    if name == "mlp":
        adata = make_adata(n_cells, length)
        context = RunContext(roles=DataRoles(label_key="label"), adata=adata, train_settings=train)
        warm = RunContext(
            roles=DataRoles(label_key="label"),
            adata=make_adata(8, length),
            train_settings=train,
        )
    else:
        tokens = make_tokens(name, n_cells, length)
        context = RunContext(roles=DataRoles(label_key="label"), tokens=tokens, train_settings=train)
        warm = RunContext(
            roles=DataRoles(label_key="label"),
            tokens=make_tokens(name, 4, 16),
            train_settings=train,
        )
    cls(**params).fit(warm)  # imports and first-call set-up stay out of the timing
    baseline = rss_mb()
    started = time.perf_counter()
    model = cls(**params).fit(context)
    train_seconds = time.perf_counter() - started
    result = {
        "train_cells_per_s": n_cells / model.history_[-1]["train/epoch_seconds"],
        "fit_seconds": train_seconds,
        "train_peak_mb": rss_mb(),
        "train_growth_mb": rss_mb() - baseline,
    }
    if name == "mlp":
        return result
    n_eval = spec["n_eval"]
    eval_tokens = context.tokens.subset(np.arange(min(n_eval, n_cells)))
    model.predict_proba(eval_tokens.subset(np.arange(1)), batch_size=1)  # warm the inference path
    list(model.attention(eval_tokens.subset(np.arange(1)), batch_size=1))
    timings = {"forward": [], "attention": []}
    for _ in range(spec["repeats"]):
        started = time.perf_counter()
        model.predict_proba(eval_tokens, batch_size=spec["attention_batch"])
        timings["forward"].append(time.perf_counter() - started)
        started = time.perf_counter()
        for cell_map in model.attention(eval_tokens, batch_size=spec["attention_batch"]):
            assert cell_map.attention.shape[0] > 0
        timings["attention"].append(time.perf_counter() - started)
    forward, attention = min(timings["forward"]), min(timings["attention"])
    # the whole attention extractor: maps plus the weighted Z/M aggregation over the gene universe
    from grnx_plugins.extractors.attention import AttentionExtractor

    extract_context = RunContext(roles=DataRoles(label_key="label"), tokens=eval_tokens)
    extract_context.model = model
    extractor = AttentionExtractor(batch_size=spec["attention_batch"])
    cells = np.arange(eval_tokens.n_cells)
    universe = extractor._universe(model, extract_context, cells)
    started = time.perf_counter()
    extractor.aggregate(model, extract_context, cells, np.ones(len(cells)), universe)
    extract = time.perf_counter() - started
    result.update(
        {
            "forward_cells_per_s": eval_tokens.n_cells / forward,
            "attention_cells_per_s": eval_tokens.n_cells / attention,
            "attention_over_forward": attention / forward,
            "extract_cells_per_s": eval_tokens.n_cells / extract,
            "extract_genes": len(universe),
            "peak_mb": rss_mb(),
        }
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and short sequences")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="tokens per cell")
    parser.add_argument("--models", nargs="+", default=["celluformer", "geneformer", "scgpt", "mlp"])
    parser.add_argument("--batch-size", type=int, default=4, help="training batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=2, help="timing repeats (best kept)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    size = "quick" if args.quick else "default"
    lengths = args.lengths or ([64, 128] if args.quick else [256, 1024, 2048])
    print(
        f"grnx model benchmark ({size} sizes, CPU, {args.threads} torch thread(s), training batch "
        f"{args.batch_size}); reference: attention extraction vs a plain forward pass, target <= 1.5x"
    )
    header = (
        f"{'model':<12}{'L':>6}{'train cells/s':>15}{'train peak MB':>15}{'+MB':>8}"
        f"{'fwd cells/s':>13}{'attn cells/s':>14}{'attn/fwd':>10}{'extract cells/s':>17}"
    )
    print(header)
    print("-" * len(header))
    for name in args.models:
        for length in lengths:
            n_cells = max(4, min(32, 8192 // length)) if not args.quick else 16
            spec = {
                "model": name,
                "length": length,
                "n_cells": n_cells,
                "batch_size": args.batch_size,
                "size": size,
                "threads": args.threads,
                "n_eval": n_cells,
                "repeats": args.repeats,
                "attention_batch": args.batch_size,
            }
            completed = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(spec)],
                capture_output=True,
                text=True,
            )
            if completed.returncode != 0:
                print(f"{name:<12}{length:>6}  failed: {completed.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(completed.stdout.strip().splitlines()[-1])
            attention = (
                (
                    f"{r['forward_cells_per_s']:>13.2f}{r['attention_cells_per_s']:>14.2f}"
                    f"{r['attention_over_forward']:>9.2f}x{r['extract_cells_per_s']:>17.2f}"
                )
                if "attention_over_forward" in r
                else f"{'-':>13}{'-':>14}{'-':>10}{'-':>17}"
            )
            print(
                f"{name:<12}{length:>6}{r['train_cells_per_s']:>15.2f}{r['train_peak_mb']:>15.0f}"
                f"{r['train_growth_mb']:>8.0f}{attention}",
                flush=True,
            )


if __name__ == "__main__":
    main()
