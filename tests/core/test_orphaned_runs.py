"""Runs left RUNNING by a process killed outright are marked FAILED by the next run on the store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from mlflow.tracking import MlflowClient

from grnx_core import tracking
from grnx_core.tracking import HOST_TAG, PID_TAG, PROCESS_START_TAG, Tracker, process_state

EXPERIMENT = "orphaned-runs"

KILLED_CHILD = textwrap.dedent(f"""
    import os, signal
    from grnx_core.tracking import Tracker

    run = Tracker().start_run({EXPERIMENT!r}, "killed")
    print(run.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def _killed_run() -> tuple[str, int]:
    """A run created through Tracker by a process that then SIGKILLs itself: (run id, its pid)."""
    # The child inherits MLFLOW_TRACKING_URI, so it writes to this session's isolated store.
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, err
    return out.strip(), child.pid


def _run_with_tags(tracker: Tracker, tags: dict[str, str]) -> str:
    return tracker.client.create_run(tracker.experiment_id(EXPERIMENT), tags=tags).info.run_id


def test_runs_of_killed_processes_are_failed_and_others_left_alone():
    tracker = Tracker(os.environ["MLFLOW_TRACKING_URI"])
    client = MlflowClient(tracker.tracking_uri)
    killed, dead_pid = _killed_run()
    assert client.get_run(killed).info.status == "RUNNING"
    tags = client.get_run(killed).data.tags
    assert tags[HOST_TAG] == socket.gethostname() and tags[PID_TAG] == str(dead_pid)
    assert float(tags[PROCESS_START_TAG]) > 0

    live = tracker.start_run(EXPERIMENT, "live").run_id  # this test's own process
    host = socket.gethostname()
    elsewhere = _run_with_tags(tracker, {HOST_TAG: "another-host", PID_TAG: str(dead_pid)})
    # This process's pid, but tagged as started an hour before it: the pid was reused.
    _, started = process_state(os.getpid())
    reused = _run_with_tags(
        tracker,
        {
            HOST_TAG: host,
            PID_TAG: str(os.getpid()),
            PROCESS_START_TAG: repr(started - 3600),
        },
    )
    untagged = _run_with_tags(tracker, {})

    failed = tracker.fail_orphaned_runs(found_by="finder123")

    assert killed in failed and reused in failed
    assert not {live, elsewhere, untagged} & set(failed)
    run = client.get_run(killed)
    assert run.info.status == "FAILED" and run.info.end_time is not None
    error = run.data.tags["grnx.error"]
    assert error.startswith(f"killed: process {dead_pid} on host {host} ended without finishing this run")
    assert "found by run finder123 at " in error
    assert "now belongs to another process" in client.get_run(reused).data.tags["grnx.error"]
    for run_id in (live, elsewhere, untagged):
        run = client.get_run(run_id)
        assert run.info.status == "RUNNING" and "grnx.error" not in run.data.tags
    # Already FAILED runs are not searched again.
    assert not {killed, reused} & set(tracker.fail_orphaned_runs())
    for run_id in (live, elsewhere, untagged):
        client.set_terminated(run_id)


def test_runs_are_found_across_pages_and_experiments(monkeypatch):
    tracker = Tracker(os.environ["MLFLOW_TRACKING_URI"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = {HOST_TAG: socket.gethostname(), PID_TAG: str(dead.pid)}
    orphans = [_run_with_tags(tracker, owner) for _ in range(3)]
    other_experiment = tracker.experiment_id("orphaned-runs-other")
    orphans.append(tracker.client.create_run(other_experiment, tags=owner).info.run_id)

    search_runs = tracker.client.search_runs
    page_sizes = []

    def small_pages(*args, **kwargs):
        kwargs["max_results"] = 2
        page_sizes.append(kwargs["max_results"])
        return search_runs(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "search_runs", small_pages)
    assert set(orphans) <= set(tracker.fail_orphaned_runs())
    assert len(page_sizes) >= 2  # more than one page was read


def test_process_state_without_psutil_matches_psutil(monkeypatch):
    if not os.path.exists("/proc/self/stat"):
        pytest.skip("no /proc on this system")
    with_psutil = process_state(os.getpid())
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now fails
    alive, started = tracking.process_state(os.getpid())
    assert alive and with_psutil[0]
    assert started == pytest.approx(with_psutil[1], abs=0.05)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, ended.pid, os.WEXITED | os.WNOWAIT)  # ended, not reaped: a zombie has ended too
    assert os.path.exists(f"/proc/{ended.pid}")
    assert tracking.process_state(ended.pid) == (False, None)
    ended.wait()
    assert tracking.process_state(ended.pid) == (False, None)
