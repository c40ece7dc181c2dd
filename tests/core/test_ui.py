"""`grnx ui` stops the whole MLflow server, however grnx itself is stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from .local_ports import free_port, listening

# Stands in for `python -m mlflow ui`: like uvicorn, a parent and a worker that share the
# listening socket, so the port stays held until both are gone. It records its process group.
FAKE_MLFLOW = textwrap.dedent("""
    import os, socket, sys, time

    port = int(sys.argv[sys.argv.index("--port") + 1])
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen()
    with open(os.environ["FAKE_MLFLOW_GROUP"], "w") as file:
        file.write(str(os.getpgid(0)))
    os.fork()  # the worker
    while True:
        time.sleep(1)
""")


def _wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _group_gone(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def fake_mlflow(tmp_path) -> dict[str, str]:
    package = tmp_path / "fake" / "mlflow"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(FAKE_MLFLOW)
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")]),
        "FAKE_MLFLOW_GROUP": str(tmp_path / "group"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}",
    }


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_stopping_grnx_ui_frees_the_port(tmp_path, fake_mlflow, signum):
    port = free_port()
    grnx = subprocess.Popen(
        [sys.executable, "-m", "grnx_core.cli", "ui", "--port", str(port)],
        env=fake_mlflow,
        stderr=subprocess.PIPE,
        text=True,
    )
    group_file = Path(fake_mlflow["FAKE_MLFLOW_GROUP"])
    try:
        assert _wait_for(lambda: listening(port) and group_file.exists(), 60), "the server did not start"
        group = int(group_file.read_text())
        assert group != os.getpgid(grnx.pid)  # its own process group
        grnx.send_signal(signum)
        grnx.wait(timeout=30)
        # SIGKILL cannot be caught: the watchdog in the server's group notices within a second.
        assert _wait_for(lambda: not listening(port) and _group_gone(group), 15), "the server is still up"
    finally:
        if grnx.poll() is None:
            grnx.kill()
        if group_file.exists():
            try:
                os.killpg(int(group_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    if signum != signal.SIGKILL:
        assert grnx.returncode == 0, grnx.stderr.read() if grnx.stderr else ""


@pytest.mark.slow
def test_stopping_grnx_ui_stops_the_real_mlflow_server(tmp_path):
    # The real server: a dozen processes; before, `kill <grnx pid>` left them all holding the port.
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"}
    grnx = subprocess.Popen(
        [sys.executable, "-m", "grnx_core.cli", "ui", "--port", str(port)], env=env, stderr=subprocess.PIPE
    )

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    try:
        assert _wait_for(healthy, 120), "the MLflow server did not start"
        grnx.send_signal(signal.SIGTERM)
        grnx.wait(timeout=30)
        assert _wait_for(lambda: not listening(port), 15)
    finally:
        if grnx.poll() is None:
            grnx.kill()
