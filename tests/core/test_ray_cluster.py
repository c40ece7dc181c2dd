"""`execution.ray_address`: grnboost2 targets, attention cell chunks and tune trials sent to an
existing Ray cluster.

The cluster is a Ray head started by the test on 127.0.0.1 (``ray start --head --block``) in its
own process group, stopped by that group: ``ray stop`` would stop every Ray of this machine.
Slow: the head, a driver and its workers each start in tens of seconds here.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from .local_ports import free_port, listening

pytestmark = pytest.mark.slow

GRNBOOST2_RECIPE = {
    "schema_version": 1,
    "name": "ray_cluster_grnboost2",
    "seed": 0,
    "data": {"name": "synthetic", "params": {"n_cells": 200, "n_genes": 12, "n_regulators": 4, "seed": 0}},
    "preprocess": [
        {"name": "normalize_total", "params": {"target_sum": 10000}},
        {"name": "log1p", "params": {}},
    ],
    "extractors": [{"name": "grnboost2", "params": {"n_estimators": 30}}],
    "tracking": {"experiment": "ray_cluster"},
}

ATTENTION_RECIPE = {
    **{key: value for key, value in GRNBOOST2_RECIPE.items() if key != "extractors"},
    "name": "ray_cluster_attention",
    "data": {**GRNBOOST2_RECIPE["data"], "label_key": "disease"},
    "tokenizer": {"name": "expression_scaled", "params": {"max_length": 16}},
    "model": {"name": "celluformer", "params": {"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32}},
    "train": {"epochs": 1, "batch_size": 32, "learning_rate": 0.003, "validation_fraction": 0.0},
    "extractors": [
        {"name": "attention", "id": "attention_raw", "params": {"batch_size": 8}},
        {
            "name": "attention",
            "id": "attention_apc",
            "params": {"variant": "case_minus_control", "case": "disease", "normalize": "apc"},
        },
    ],
}

PEARSON_TUNE = {
    **{key: value for key, value in GRNBOOST2_RECIPE.items() if key != "extractors"},
    "name": "ray_cluster_tune",
    "data": {**GRNBOOST2_RECIPE["data"], "label_key": "disease"},
    "extractors": [{"name": "pearson", "params": {"rank_by": "abs"}}],
    "evaluators": [{"name": "auprc", "params": {"ground_truth": {"source": "data"}}}],
    "tune": {
        "metric": "eval/auprc/pearson/truth_genes/epr",
        "mode": "max",
        "num_samples": 2,
        "n_initial_points": 1,
        "max_concurrent": 2,
        "space": {"extractors.0.params.rank_by": {"type": "choice", "values": ["abs", "value"]}},
    },
}


def _stop_group(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            process.poll()
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A two-CPU Ray head on 127.0.0.1, with token authentication (Ray's default since 2.5x)."""
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists() and shutil.which("ray") is None:
        pytest.skip("the `ray` command is not installed")
    port = free_port()
    # A token of its own (not ~/.ray/auth_token): the head and grnx share it through the environment.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    temp_dir = tmp_path_factory.mktemp("ray")
    command = [
        str(ray_cli if ray_cli.exists() else shutil.which("ray")),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=2",
        "--disable-usage-stats",
        "--include-dashboard=false",
        f"--temp-dir={temp_dir}",
    ]
    log = (temp_dir / "ray_start.log").open("w")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not listening(port):
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start: {(temp_dir / 'ray_start.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", env
    finally:
        _stop_group(head)
        log.close()
    assert not listening(port), f"the Ray head still holds port {port}"


def _grnx_run(tmp_path: Path, recipe: dict, *overrides: str, env: dict[str, str]) -> tuple[str, str]:
    """``grnx run`` in a new process; returns the run id it prints and its stderr."""
    path = tmp_path / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(
        [str(Path(sys.executable).with_name("grnx")), "run", str(path), "--no-cache", *overrides],
        env={**env, "MLFLOW_TRACKING_URI": uri, "GRNX_CACHE_DIR": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    match = re.search(r"^(?:run|tune) ([0-9a-f]{32}): FINISHED", done.stdout, re.MULTILINE)
    assert match, done.stdout
    return match.group(1), done.stderr


def port_of(address: str) -> str:
    return address.rsplit(":", 1)[1]


def _interactions(tmp_path: Path, run_id: str, extractor: str) -> pd.DataFrame:
    (found,) = tmp_path.glob(f"artifacts/*/{run_id}/artifacts/interactions/{extractor}.parquet")
    return pd.read_parquet(found)


def test_grnboost2_on_a_ray_cluster_gives_the_in_process_result(tmp_path, ray_head):
    address, env = ray_head
    here, _ = _grnx_run(tmp_path, GRNBOOST2_RECIPE, "execution.num_workers=1", env=env)
    cluster, log = _grnx_run(
        tmp_path, GRNBOOST2_RECIPE, "execution.num_workers=2", f"execution.ray_address={address}", env=env
    )
    expected = _interactions(tmp_path, here, "grnboost2")
    found = _interactions(tmp_path, cluster, "grnboost2")
    assert len(expected) == 12 * 11  # every regulator -> target link of 12 genes
    pd.testing.assert_frame_equal(found, expected)
    # Ray's own words: the run joined the head, it did not start a Ray of its own.
    assert re.search(rf"Connecting to existing Ray cluster at address: \S+:{port_of(address)}\b", log), log
    assert "Connected to Ray cluster" in log


def test_a_tune_on_a_ray_cluster_logs_its_trials_from_the_driver(tmp_path, ray_head):
    address, env = ray_head
    parent, _ = _grnx_run(tmp_path, PEARSON_TUNE, f"--ray-address={address}", env=env)

    from grnx_core.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = tracker.client.get_run(parent)
    assert run.data.metrics["tune/n_finished"] == 2
    trials = tracker.client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    assert len(trials) == 2 and {t.info.status for t in trials} == {"FINISHED"}
    assert {t.data.params["extractors.0.params.rank_by"] for t in trials} <= {"abs", "value"}
    best = max(trials, key=lambda t: t.data.metrics["eval/auprc/pearson/truth_genes/epr"])
    assert run.data.tags["grnx.tune.best_run"] == best.info.run_id


def test_attention_chunks_on_a_ray_cluster_give_the_in_process_result(tmp_path, ray_head):
    address, env = ray_head
    here, _ = _grnx_run(tmp_path, ATTENTION_RECIPE, "execution.num_workers=1", env=env)
    cluster, log = _grnx_run(
        tmp_path, ATTENTION_RECIPE, "execution.num_workers=2", f"execution.ray_address={address}", env=env
    )
    for extractor in ("attention_raw", "attention_apc"):
        expected = _interactions(tmp_path, here, extractor)
        found = _interactions(tmp_path, cluster, extractor)
        assert len(expected) > 20
        # the same ranked pairs; scores up to float rounding (other batches, another addition order)
        pd.testing.assert_frame_equal(found.drop(columns="score"), expected.drop(columns="score"))
        pd.testing.assert_series_equal(found["score"], expected["score"], check_exact=False, rtol=1e-6)
    assert re.search(rf"Connecting to existing Ray cluster at address: \S+:{port_of(address)}\b", log), log
