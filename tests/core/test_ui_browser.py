"""`grnx ui` in a real browser: headless Chromium renders the MLflow UI on a tracked grnx run.

Chromium's ``--dump-dom`` prints the page after its scripts ran (``--virtual-time-budget`` lets
the React app fetch and render), so the names are checked in what a user would see.
Slow: a tracked run, the MLflow server and Chromium each take tens of seconds here.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .local_ports import free_port, listening

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
REPO_ROOT = Path(__file__).resolve().parents[2]
FIGURE = "auprc_pearson_pr_roc.png"  # logged by the quickstart's auprc evaluator


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _visible_text(url: str) -> str:
    """The page's text once Chromium ran its scripts, without markup, scripts and styles."""
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=15000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", done.stdout, flags=re.DOTALL)
    return " ".join(re.sub(r"<[^>]+>", " ", text).split())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_the_ui_shows_the_experiment_the_run_and_its_figure(tmp_path):
    from grnx_core.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "GRNX_CACHE_DIR": str(tmp_path / "cache")}
    grnx = str(Path(sys.executable).with_name("grnx"))
    done = subprocess.run(
        [grnx, "run", str(REPO_ROOT / "recipes" / "quickstart.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    run_id = re.search(r"^run ([0-9a-f]{32}): FINISHED", done.stdout, re.MULTILINE).group(1)
    tracker = Tracker(uri)
    run = tracker.client.get_run(run_id)
    run_name = run.data.tags["mlflow.runName"]
    experiment_id = run.info.experiment_id
    assert tracker.client.get_experiment(experiment_id).name == "quickstart"

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "ui.log"  # a file, not a pipe: a full pipe would stall the server
    with log.open("w") as output:
        ui = subprocess.Popen(
            [grnx, "ui", "--port", str(port)],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 240
        while not _answers(base + "/"):
            assert ui.poll() is None, f"grnx ui ended: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the MLflow UI did not answer within 240 s"
            time.sleep(1)

        experiments = _visible_text(f"{base}/#/experiments?workflowType=machine_learning")
        assert "quickstart" in experiments, experiments[:2000]
        runs = _visible_text(f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
        assert run_name in runs, runs[:2000]
        # The run page, its artifact tab open at the figure, as `grnx run` prints the run's link.
        figure_page = _visible_text(
            f"{base}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/eval/figures/{FIGURE}"
            "?workflowType=machine_learning"
        )
        assert run_name in figure_page and FIGURE in figure_page, figure_page[:2000]
        assert f"eval/figures/{FIGURE}" in figure_page
    finally:
        os.killpg(ui.pid, signal.SIGTERM)  # grnx stops the server's whole group on SIGTERM
        try:
            ui.wait(timeout=30)
        finally:
            if ui.poll() is None:
                os.killpg(ui.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while listening(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not listening(port), f"port {port} is still held after grnx ui stopped"
