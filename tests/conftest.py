"""Shared fixtures: the reference data beside the project, and an isolated tracking store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GRNX_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or ``$GRNX_SHARED_DATA``); the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA} (set GRNX_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _isolated_grnx_dirs(tmp_path_factory):
    """Keep the cache and tracking store of the whole session out of the repository and home."""
    base = tmp_path_factory.mktemp("grnx-session")
    (base / "mlflow").mkdir()
    settings = {
        "GRNX_CACHE_DIR": str(base / "grnx-cache"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow' / 'mlflow.db'}",
        "MPLBACKEND": "Agg",
    }
    previous = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    yield
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs for one test module (one already started in this process is reused)."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
