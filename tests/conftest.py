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


@pytest.fixture(autouse=True)
def _isolated_grnx_dirs(tmp_path_factory, monkeypatch):
    """Keep every test's cache and tracking store out of the repository and the user's home."""
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("GRNX_CACHE_DIR", str(base / "grnx-cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{base / 'mlflow' / 'mlflow.db'}")
    (base / "mlflow").mkdir(exist_ok=True)
    monkeypatch.setenv("MPLBACKEND", "Agg")
