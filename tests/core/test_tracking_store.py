"""The tracking store under load: processes creating it at once, values beyond MLflow's limits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

from mlflow.tracking import MlflowClient

from grnx_core.tracking import MAX_PARAM_LENGTH, Tracker

# Waits for the go file, so both processes open the new store within a millisecond of each other.
WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path

    from grnx_core.tracking import Tracker

    uri, go = sys.argv[1], Path(sys.argv[2])
    Path(sys.argv[3]).touch()
    while not go.exists():
        time.sleep(0.001)
    run = Tracker(uri).start_run("concurrent", "worker")
    run.end()
""")


def test_two_processes_can_create_a_new_store_at_once(tmp_path):
    # Without the lock one of them failed with "table ... already exists" (3 of 3 tries).
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, uri, str(go), str(flag)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flag in ready
    ]
    deadline = time.monotonic() + 120
    while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outcomes = [(worker.wait(timeout=180), worker.stderr.read()) for worker in workers]
    for code, err in outcomes:
        assert code == 0, err
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("concurrent")
    assert len(client.search_runs([experiment.experiment_id])) == 2


def test_a_long_tag_is_kept_whole_as_an_artifact(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = tracker.start_run("long-tags", "r")
    value = "traceback line\n" * 1000
    run.set_tags({"grnx.error": value, "short": "kept"})
    run.end()
    tags = tracker.client.get_run(run.run_id).data.tags
    assert tags["short"] == "kept"
    cut = tags["grnx.error"]
    assert len(cut) <= MAX_PARAM_LENGTH and value.startswith(cut.split(" ... (")[0])
    assert cut.endswith(f"({len(value):,} characters; the whole value is the artifact tags/grnx.error.txt)")
    local = tracker.client.download_artifacts(run.run_id, "tags/grnx.error.txt", str(tmp_path))
    with open(local, encoding="utf-8") as file:
        assert file.read() == value


def test_long_params_are_still_kept_whole(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = tracker.start_run("long-params", "r")
    run.log_params({"grid": list(range(5000))})
    local = tracker.client.download_artifacts(run.run_id, "params/long_values.json", str(tmp_path))
    with open(local, encoding="utf-8") as file:
        assert json.loads(json.load(file)["grid"]) == list(range(5000))
