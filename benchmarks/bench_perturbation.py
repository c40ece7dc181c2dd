"""In silico perturbation throughput: grnx's ``insilico_perturbation`` against Geneformer's loop.

Task (default; the issue's size): every gene of 100 cells of 1,500 rank-value tokens deleted in turn
(150,000 perturbations), the shift of each cell embedding toward a goal state (the mean embedding of
20 goal cells) measured at the penultimate layer, on a Geneformer V1-size BERT (6 layers, hidden 256,
4 heads, intermediate 512, 2,048 positions, 25,426-token vocabulary; Theodoris et al. 2023,
gf-6L-30M-i2048 ``config.json``) with random weights (speed does not depend on them), on the CPU.

* grnx: the extractor as a recipe runs it (cell embeddings of the goal cells, each unperturbed cell
  embedded once, perturbed copies batched across cells by length, encoder run only up to the layer
  read, statistics, gene-gene shifts and the table included).
* reference: a direct re-implementation of Geneformer's ``InSilicoPerturber.isp_perturb_all`` with
  ``cell_states_to_model`` (``geneformer/in_silico_perturber.py`` and ``perturber_utils.py``; read at
  github.com/haroonshakeel/Geneformer): cell by cell, the original cell in its own forward pass, then
  the cell's perturbed copies (Python lists, ``delete_indices``) in minibatches of
  ``forward_batch_size``, each a full forward of Hugging Face ``BertForSequenceClassification`` with
  ``output_hidden_states=True``, the mean of ``hidden_states[layer]`` and ``cos_sim_shift`` to the
  goal. ``--reference-batch-sizes 1`` is one forward pass per perturbed cell; Geneformer's default
  ``forward_batch_size`` is 100. The reference skips Geneformer's ``datasets`` map/select overhead and
  its pickling of the results, so it is faster than Geneformer itself. Both run the same weights; the
  per-gene mean shifts of the two are compared (``max |diff|``).

grnx also runs with ``precision: bfloat16`` (``torch.autocast``; AMX on recent Xeons), whose
shifts differ from float32's by the ``max |diff|`` shown.

Each measurement runs in its own subprocess so that ``ru_maxrss`` (peak resident memory) is its own.
Throughput is perturbations per second of wall time on ``--threads`` torch threads.

Usage:  python benchmarks/bench_perturbation.py --quick          (4 cells x 128 genes; about a minute)
        python benchmarks/bench_perturbation.py --n-cells 10 --n-genes 512 --threads 2
        python benchmarks/bench_perturbation.py                  (the full size: hours on a CPU)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import pandas as pd

#: Geneformer V1 (gf-6L-30M-i2048): what grnx's geneformer builds with architecture "v1"
V1_VOCABULARY = 25_426
SIZES = {
    "v1": {"architecture": "v1"},
    "tiny": {"architecture": "v1", "n_layers": 2, "hidden_size": 32, "n_heads": 4, "intermediate_size": 64},
}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_tokens(n_start: int, n_goal: int, n_genes: int, seed: int = 0):
    """Rank-value V1 cells (<pad>=0, <mask>=1, no special tokens) of exactly ``n_genes`` genes."""
    from grnx_core import TokenizedCells

    rng = np.random.default_rng(seed)
    vocabulary = ["<pad>", "<mask>"] + [f"ENSG{i:011d}" for i in range(V1_VOCABULARY - 2)]
    n_cells = n_start + n_goal
    ids = np.concatenate(
        [rng.choice(np.arange(2, V1_VOCABULARY), n_genes, replace=False) for _ in range(n_cells)]
    )
    states = ["start"] * n_start + ["goal"] * n_goal
    return TokenizedCells(
        input_ids=ids,
        offsets=np.arange(n_cells + 1) * n_genes,
        obs=pd.DataFrame({"state": states}, index=[f"c{i}" for i in range(n_cells)]),
        vocabulary=vocabulary,
        metadata={"pad_id": 0, "vocab_size": V1_VOCABULARY, "special_ids": [0, 1], "model_input_size": 2048},
    )


def make_model(tokens, size: str, seed: int = 0):
    """A fitted-looking geneformer with random weights (built as ``fit`` builds it, not trained)."""
    import torch

    from grnx_plugins.models._base import token_info
    from grnx_plugins.models.geneformer import Geneformer

    torch.manual_seed(seed)
    model = Geneformer(**SIZES[size], dropout=0.0)
    model.token_info_ = token_info(tokens)
    model.vocabulary_ = list(tokens.vocabulary)
    model.classes_, model.label_key_, model.history_ = ["goal", "start"], "state", []
    model.network_ = model._build_network(model.token_info_, 2, tokens).eval()
    return model


def run_grnx(spec: dict, tokens, model) -> tuple[float, pd.Series]:
    from grnx_core import DataRoles, RunContext
    from grnx_plugins.extractors.insilico_perturbation import InsilicoPerturbationExtractor

    context = RunContext(seed=0, roles=DataRoles(cell_type_key="state"), tokens=tokens, model=model)
    extractor = InsilicoPerturbationExtractor(
        state_key="state",
        start_state="start",
        goal_state="goal",
        batch_size=spec["batch_size"],
        precision=spec.get("precision", "float32"),
        seed=0,
    )
    tables = {}

    class Logger:
        def log_artifact(self, path, artifact_path=None):
            tables["table"] = pd.read_parquet(path)

        def log_figure(self, name, figure):
            pass

        def log_metrics(self, metrics, step=None):
            pass

    context.logger = Logger()
    started = time.perf_counter()
    extractor.extract(context)
    seconds = time.perf_counter() - started
    table = tables["table"].set_index("Gene")["Shift_to_goal_end"]
    return seconds, table


def run_reference(spec: dict, tokens, model) -> tuple[float, pd.Series]:
    """Geneformer's isp_perturb_all loop with cell states, on the model's Hugging Face BERT."""
    import torch

    hf = model.network_.hf
    n_layers = hf.config.num_hidden_layers
    layer_to_quant = n_layers + (-1)  # Geneformer: quant_layers(model) + emb_layer, emb_layer=-1 default
    batch_size = spec["reference_batch_size"]

    def embed(cells: list[list[int]]) -> torch.Tensor:
        # get_embs: pad to the longest, attention mask, hidden_states[layer_to_quant], mean over non-padding
        lengths = torch.tensor([len(c) for c in cells])
        width = int(lengths.max())
        ids = torch.zeros(len(cells), width, dtype=torch.long)
        for row, cell in enumerate(cells):
            ids[row, : len(cell)] = torch.tensor(cell)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        with torch.no_grad():
            outputs = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = outputs.hidden_states[layer_to_quant]
        hidden = hidden.masked_fill(~mask.bool()[:, :, None], 0.0)
        return hidden.sum(dim=1) / lengths[:, None]

    states = tokens.obs["state"].to_numpy()
    cell_ids = [tokens.cell(c)[0].tolist() for c in range(tokens.n_cells)]
    cos = torch.nn.CosineSimilarity(dim=1)
    started = time.perf_counter()
    goal_cells = [cell_ids[c] for c in np.flatnonzero(states == "goal")]
    goal = torch.cat(
        [embed(goal_cells[i : i + batch_size]) for i in range(0, len(goal_cells), batch_size)]
    ).mean(0)
    shifts: dict[int, list[float]] = {}
    for cell in np.flatnonzero(states == "start"):
        example = cell_ids[cell]
        original = embed([example])
        perturbations = []
        for index in range(len(example)):  # make_perturbation_batch + delete_indices
            perturbed = list(example)
            del perturbed[index]
            perturbations.append(perturbed)
        for start in range(0, len(perturbations), batch_size):
            embeddings = embed(perturbations[start : start + batch_size])
            shift = cos(embeddings, goal[None, :]) - cos(original, goal[None, :])  # cos_sim_shift
            for gene, value in zip(example[start : start + batch_size], shift.tolist()):
                shifts.setdefault(gene, []).append(value)
    seconds = time.perf_counter() - started
    table = pd.Series({tokens.vocabulary[g]: float(np.mean(v)) for g, v in shifts.items()})
    return seconds, table


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    tokens = make_tokens(spec["n_cells"], spec["n_goal"], spec["n_genes"])
    model = make_model(tokens, spec["size"])
    warm = make_tokens(1, 1, 8, seed=1)
    warm_model = make_model(warm, "tiny")
    (run_grnx if spec["which"] == "grnx" else run_reference)(
        {**spec, "reference_batch_size": 2}, warm, warm_model
    )
    baseline = rss_mb()
    runner = run_grnx if spec["which"] == "grnx" else run_reference
    seconds, table = runner(spec, tokens, model)
    n_perturbations = spec["n_cells"] * spec["n_genes"]
    return {
        "seconds": seconds,
        "perturbations_per_s": n_perturbations / seconds,
        "peak_mb": rss_mb(),
        "growth_mb": rss_mb() - baseline,
        "shifts": table.to_dict(),
    }


def measure(spec: dict) -> dict:
    completed = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True
    )
    if completed.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=100, help="cells perturbed (start state)")
    parser.add_argument("--n-genes", type=int, default=1500, help="genes (tokens) per cell, each deleted")
    parser.add_argument("--n-goal", type=int, default=20, help="cells of the goal state")
    parser.add_argument("--size", choices=sorted(SIZES), default="v1", help="model size")
    parser.add_argument("--batch-size", type=int, default=32, help="grnx: copies per forward pass")
    parser.add_argument(
        "--reference-batch-sizes",
        type=int,
        nargs="+",
        default=[1, 32],
        help="reference: Geneformer's forward_batch_size (1: one forward pass per perturbed cell)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-bfloat16", action="store_true", help="skip grnx's precision: bfloat16 run")
    parser.add_argument("--quick", action="store_true", help="4 cells x 128 genes, 4 goal cells")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.n_cells, args.n_genes, args.n_goal = 4, 128, 4
    base = {
        "n_cells": args.n_cells,
        "n_genes": args.n_genes,
        "n_goal": args.n_goal,
        "size": args.size,
        "batch_size": args.batch_size,
        "threads": args.threads,
    }
    n = args.n_cells * args.n_genes
    print(
        f"{n:,} deletions ({args.n_cells} cells x {args.n_genes} genes, goal: {args.n_goal} cells), "
        f"geneformer {args.size}, {args.threads} thread(s)"
    )
    grnx = measure({**base, "which": "grnx"})
    rows = [("grnx insilico_perturbation", f"batch {args.batch_size}", grnx)]
    if not args.no_bfloat16:
        bf16 = measure({**base, "which": "grnx", "precision": "bfloat16"})
        rows.append(("grnx insilico_perturbation", f"batch {args.batch_size} bfloat16", bf16))
    for size in args.reference_batch_sizes:
        rows.append(
            (
                "Geneformer loop",
                f"forward_batch_size {size}",
                measure({**base, "which": "reference", "reference_batch_size": size}),
            )
        )
    print(
        f"{'':28s} {'':22s} {'s':>9s} {'perturb/s':>10s} {'peak MB':>8s} {'+MB':>7s} {'ratio':>6s} {'max |diff|':>10s}"
    )
    for name, setting, result in rows:
        ratio = result["seconds"] / grnx["seconds"]
        shared = set(result["shifts"]) & set(grnx["shifts"])
        diff = max(abs(result["shifts"][g] - grnx["shifts"][g]) for g in shared)
        print(
            f"{name:28s} {setting:22s} {result['seconds']:9.2f} {result['perturbations_per_s']:10.1f} "
            f"{result['peak_mb']:8.0f} {result['growth_mb']:7.0f} {ratio:6.2f} {diff:10.2e}"
        )
    print("ratio: seconds / grnx float32 seconds (above 1: slower than grnx); max |diff|: largest")
    print("difference of a gene's mean Shift_to_goal_end from grnx float32's")


if __name__ == "__main__":
    main()
