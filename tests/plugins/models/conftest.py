"""Tiny labelled token sets and run contexts for the model tests (CPU, seconds)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from grnx_core import DataRoles, RunContext, TokenizedCells


class RecordingLogger:
    """Keeps what a model logs, to check per-epoch metrics."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int | None, dict[str, float]]] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_figure(self, name, figure):
        pass

    def log_table(self, name, table):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass


def build_tokens(
    n_cells: int = 24,
    n_genes: int = 20,
    seed: int = 0,
    values: str | None = "expression",
    prefix: list[str] | None = None,
    suffix: list[str] | None = None,
    min_genes: int = 3,
    max_genes: int = 8,
) -> TokenizedCells:
    """Cells of two labels ("case"/"control"); case cells always express gene G1, controls never.

    Token ids: 0 = <pad>, then the special tokens named in ``prefix``/``suffix`` (e.g. <cls>,
    <eos>), then the genes. ``values``: "expression" (positive floats), "bins" (integers 1..5, the
    <cls> value 0) or None (rank-value tokens without values).
    """
    rng = np.random.default_rng(seed)
    specials = ["<pad>", *(prefix or []), *(suffix or [])]
    vocabulary = specials + [f"G{i}" for i in range(1, n_genes + 1)]
    gene_ids = np.arange(len(specials), len(vocabulary))
    marker = gene_ids[0]
    ids, vals, offsets, labels = [], [], [0], []
    for cell in range(n_cells):
        case = cell % 2 == 0
        m = int(rng.integers(min_genes, max_genes + 1))
        genes = rng.choice(gene_ids[1:], m, replace=False)
        if case:
            genes[0] = marker
        sequence = (
            [vocabulary.index(t) for t in prefix or []]
            + list(genes)
            + [vocabulary.index(t) for t in suffix or []]
        )
        ids.extend(sequence)
        if values == "expression":
            vals.extend(
                [0.0] * len(prefix or []) + list(rng.uniform(0.5, 2.0, m)) + [0.0] * len(suffix or [])
            )
        elif values == "bins":
            vals.extend(
                [0.0] * len(prefix or [])
                + list(rng.integers(1, 6, m).astype(float))
                + [0.0] * len(suffix or [])
            )
        offsets.append(offsets[-1] + len(sequence))
        labels.append("case" if case else "control")
    obs = pd.DataFrame({"label": labels}, index=[f"cell{i}" for i in range(n_cells)])
    return TokenizedCells(
        input_ids=np.array(ids),
        offsets=np.array(offsets),
        obs=obs,
        values=None if values is None else np.array(vals, dtype=np.float32),
        vocabulary=vocabulary,
        metadata={"pad_id": 0, "vocab_size": len(vocabulary)},
    )


def build_context(tokens: TokenizedCells, seed: int = 0, **train) -> RunContext:
    settings = {
        "epochs": 30,
        "batch_size": 8,
        "learning_rate": 0.003,
        "validation_fraction": 0.0,
        "device": "cpu",
        **train,
    }
    return RunContext(
        seed=seed,
        roles=DataRoles(label_key="label"),
        tokens=tokens,
        train_settings=SimpleNamespace(**settings),
        logger=RecordingLogger(),
    )


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread; on a busy machine two threads wait on each other."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def make_tokens():
    return build_tokens


@pytest.fixture
def make_context():
    return build_context
