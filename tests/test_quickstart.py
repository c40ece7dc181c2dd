"""The README's quickstart, end to end through the CLI, checked against independent computations."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scanpy as sc
from mlflow.tracking import MlflowClient
from sklearn.metrics import average_precision_score, roc_auc_score

from grnx_core.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _true_pairs() -> set[frozenset]:
    """Krumsiek et al. 2011, Table 1, as coded in scanpy's model file: 30 couplings, 4 self-loops."""
    import scanpy

    text = (Path(scanpy.__file__).parent / "sim_models" / "krumsiek11.txt").read_text()
    couplings = text.split("# coupling list:")[1].strip().splitlines()
    assert len(couplings) == 30
    pairs = {frozenset(line.split()[:2]) for line in couplings}
    return {p for p in pairs if len(p) == 2}


def _ranked_pearson():
    adata = sc.datasets.krumsiek11()
    corr = np.corrcoef(np.asarray(adata.X, dtype=np.float64), rowvar=False)
    genes = list(adata.var_names)
    rows, cols = np.triu_indices(len(genes), 1)
    scores = np.abs(corr[rows, cols])
    order = np.argsort(-scores, kind="stable")
    pairs = [frozenset((genes[rows[i]], genes[cols[i]])) for i in order]
    return pairs, scores[order]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    code = main(["run", str(ROOT / "recipes" / "quickstart.yaml"), "--no-cache"])
    assert code == 0
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("quickstart")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]


def test_quickstart_finishes_and_logs_its_outputs(quickstart_run):
    client, run = quickstart_run
    assert run.info.status == "FINISHED"
    paths = {a.path for a in client.list_artifacts(run.info.run_id, "interactions")}
    assert paths == {"interactions/pearson.parquet", "interactions/spearman.parquet"}
    assert any(a.path.startswith("eval/figures") for a in client.list_artifacts(run.info.run_id, "eval"))


def test_quickstart_auprc_auroc_and_epr_match_sklearn(quickstart_run):
    _, run = quickstart_run
    metrics = run.data.metrics
    truth = _true_pairs()
    assert len(truth) == 20  # 26 directed edges between distinct genes, 6 of them reciprocal
    pairs, scores = _ranked_pearson()
    labels = np.array([p in truth for p in pairs])
    assert metrics["eval/auprc/pearson/truth_genes/auprc"] == pytest.approx(
        average_precision_score(labels, scores), abs=1e-9
    )
    assert metrics["eval/auprc/pearson/truth_genes/auroc"] == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-9
    )
    early_precision = labels[: len(truth)].mean()
    assert metrics["eval/auprc/pearson/truth_genes/early_precision"] == pytest.approx(early_precision)
    assert metrics["eval/auprc/pearson/truth_genes/epr"] == pytest.approx(early_precision / (len(truth) / 55))
    assert metrics["eval/auprc/pearson/truth_genes/auprc_random"] == pytest.approx(20 / 55)


def test_quickstart_enrichment_score_matches_the_running_sum(quickstart_run):
    _, run = quickstart_run
    truth = _true_pairs()
    pairs, _ = _ranked_pearson()
    hits = np.array([p in truth for p in pairs])
    # GSEA prerank with the WDS paper's rank metric n-1..0 and weight 1 (Subramanian et al. 2005).
    metric = np.arange(len(pairs) - 1, -1, -1, dtype=float)
    step = np.where(hits, metric / metric[hits].sum(), -1.0 / (~hits).sum())
    running = np.cumsum(step)
    es = running[np.argmax(np.abs(running))]
    assert run.data.metrics["eval/nes/pearson/es"] == pytest.approx(es, abs=1e-9)
    assert run.data.metrics["eval/nes/pearson/nes"] > 1.0
