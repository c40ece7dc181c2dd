"""Inspecting and clearing the cache: ``Cache.entries/info/clear`` and ``grnx cache info|clear``."""

from __future__ import annotations

import io
import json
import os
import time
from datetime import datetime, timedelta, timezone

import pytest

from grnx_core import __version__
from grnx_core.cache import Cache, format_duration, format_size, parse_duration
from grnx_core.cli import main
from grnx_core.errors import GrnxError

DAY = 86_400


def _entry(cache: Cache, stage: str, key: str, n_bytes: int, last_used_days_ago: float = 0) -> None:
    with cache.store(stage, key) as folder:
        (folder / "output.bin").write_bytes(b"x" * n_bytes)
    if last_used_days_ago:
        used = time.time() - last_used_days_ago * DAY
        os.utime(cache.path(stage, key) / "done.json", (used, used))


def _marker_size(cache: Cache, stage: str, key: str) -> int:
    return (cache.path(stage, key) / "done.json").stat().st_size


@pytest.fixture
def cache(tmp_path):
    """Two model entries (one unused for 10 days) and one tokenize entry."""
    cache = Cache(tmp_path / "cache")
    _entry(cache, "model", "aa11", 5000)
    _entry(cache, "model", "bb22", 3_000_000, last_used_days_ago=10)
    _entry(cache, "tokenize", "cc33", 100)
    return cache


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_done_json_records_the_entry_and_a_hit_marks_it_used(tmp_path):
    cache = Cache(tmp_path)
    before = datetime.now(timezone.utc).replace(microsecond=0)
    _entry(cache, "extract:pearson", "ab" * 32, 10, last_used_days_ago=3)
    folder = cache.path("extract:pearson", "ab" * 32)
    marker = json.loads((folder / "done.json").read_text())
    assert marker["stage"] == "extract:pearson" and marker["key"] == "ab" * 32
    assert marker["grnx_version"] == __version__
    assert datetime.fromisoformat(marker["created"]) >= before
    assert time.time() - (folder / "done.json").stat().st_mtime > 2 * DAY

    assert cache.lookup("extract:pearson", "ab" * 32) == folder
    assert time.time() - (folder / "done.json").stat().st_mtime < 60
    assert cache.lookup("extract:pearson", "cd" * 32) is None
    assert Cache(tmp_path, enabled=False).lookup("extract:pearson", "ab" * 32) is None


def test_entries_and_info(cache):
    entries = {e.key: e for e in cache.entries()}
    assert set(entries) == {"aa11", "bb22", "cc33"}
    model = entries["bb22"]
    assert model.stage == "model" and model.path == cache.path("model", "bb22")
    assert model.n_bytes == 3_000_000 + _marker_size(cache, "model", "bb22")
    assert timedelta(days=9) < model.created - model.last_used < timedelta(days=11)
    assert model.grnx_version == __version__

    info = cache.info()
    assert list(info) == ["model", "tokenize"]
    assert info["model"].n_entries == 2
    assert info["model"].n_bytes == entries["aa11"].n_bytes + model.n_bytes
    assert info["model"].oldest_use == model.last_used
    assert info["model"].newest_use == entries["aa11"].last_used
    assert info["tokenize"].n_entries == 1
    assert Cache(cache.root / "missing").info() == {}


def test_entries_of_earlier_versions_are_read(tmp_path):
    cache = Cache(tmp_path)
    folder = cache.path("model", "ee55")
    folder.mkdir(parents=True)
    (folder / "done.json").write_text(json.dumps({"stage": "model", "key": "ee55"}))
    (entry,) = cache.entries()
    assert entry.stage == "model" and entry.grnx_version is None
    assert abs(entry.created.timestamp() - folder.stat().st_mtime) < 1


def test_clear_by_age_and_stage(cache):
    old_bytes = next(e.n_bytes for e in cache.entries() if e.key == "bb22")
    assert cache.clear(timedelta(days=7), dry_run=True) == (1, old_bytes)
    assert len(list(cache.entries())) == 3
    assert cache.clear(timedelta(days=7)) == (1, old_bytes)
    assert {e.key for e in cache.entries()} == {"aa11", "cc33"}
    assert not cache.path("model", "bb22").exists()
    assert cache.lookup("model", "bb22") is None

    n_removed, _ = cache.clear(stage="tokenize")
    assert n_removed == 1
    assert {e.key for e in cache.entries()} == {"aa11"}
    assert cache.clear()[0] == 1
    assert list(cache.entries()) == []
    assert not any(p.name.startswith(".") for p in cache.root.rglob("*"))  # nothing left renamed aside


def test_clear_removes_stale_leftovers_of_crashed_writes_only(cache):
    prefix = cache.path("model", "dd44").parent
    prefix.mkdir(parents=True)
    stale = prefix / ".dd44.tmp-k2j4h1xz"
    fresh = prefix / ".dd45.tmp-9s8d7f6g"
    retired = prefix / ".dd46.old-4242"
    for folder in (stale, fresh, retired):
        folder.mkdir()
        (folder / "part.bin").write_bytes(b"y" * 1000)
    two_hours_ago = time.time() - 2 * 3600
    for path in (stale, stale / "part.bin", retired, retired / "part.bin"):
        os.utime(path, (two_hours_ago, two_hours_ago))
    # A write in progress whose folder is old but that wrote a file just now is kept.
    os.utime(fresh, (two_hours_ago, two_hours_ago))

    old_bytes = next(e.n_bytes for e in cache.entries() if e.key == "bb22")
    assert cache.clear(timedelta(days=7)) == (3, 2000 + old_bytes)
    assert not stale.exists() and not retired.exists()
    assert fresh.exists()
    # Once nothing in it changed for an hour it is a leftover, whatever age entries must have.
    os.utime(fresh / "part.bin", (two_hours_ago, two_hours_ago))
    assert cache.clear(timedelta(days=7)) == (1, 1000)
    assert not fresh.exists()
    assert {e.key for e in cache.entries()} == {"aa11", "cc33"}


def test_clear_never_follows_symbolic_links_out_of_the_root(cache, tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data.txt").write_text("keep me")
    (outside / "done.json").write_text("{}")
    (cache.path("model", "aa11") / "link").symlink_to(outside, target_is_directory=True)
    linked_entry = cache.path("model", "ff66")
    linked_entry.parent.mkdir(parents=True)
    linked_entry.symlink_to(outside, target_is_directory=True)
    (cache.root / "linked_stage").symlink_to(outside.parent, target_is_directory=True)

    assert "ff66" not in {e.key for e in cache.entries()}
    cache.clear()
    assert (outside / "data.txt").read_text() == "keep me"
    assert (outside / "done.json").exists()
    assert linked_entry.is_symlink()
    assert not cache.path("model", "aa11").exists()


def test_clear_leaves_folders_that_are_not_entries(tmp_path):
    cache = Cache(tmp_path)
    unrelated = tmp_path / "notes" / "drafts" / "mine"
    unrelated.mkdir(parents=True)
    (unrelated / "done.json").write_text(
        "{}"
    )  # not an entry: its folder is not named by its first two letters
    unfinished = cache.path("model", "ab99")
    unfinished.mkdir(parents=True)
    assert cache.clear() == (0, 0)
    assert unrelated.exists() and unfinished.exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", timedelta(days=7)),
        ("12h", timedelta(hours=12)),
        ("30m", timedelta(minutes=30)),
        ("45s", timedelta(seconds=45)),
        ("2w", timedelta(weeks=2)),
        ("1.5h", timedelta(minutes=90)),
    ],
)
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["7", "d", "7x", "-1d", "7 days", ""])
def test_parse_duration_rejects(text):
    with pytest.raises(GrnxError, match="expected a duration such as 7d, 12h or 30m"):
        parse_duration(text)


def test_formatting():
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(3 * 1024**3) == "3.0 GiB"
    assert format_duration(timedelta(days=10, hours=5)) == "10d"
    assert format_duration(timedelta(minutes=90)) == "1h"
    assert format_duration(timedelta(seconds=42)) == "42s"


def test_cli_info(cache, capsys):
    assert main(["cache", "info", "--cache-dir", str(cache.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"cache: {cache.root}"
    assert lines[1].split()[:3] == ["stage", "entries", "size"]
    model = next(line for line in lines if line.startswith("model"))
    assert model.split()[1:4] == ["2", "2.9", "MiB"]
    assert "(just now)" in model and "(10d ago)" in model
    total = next(line for line in lines if line.startswith("total"))
    assert total.split()[1:4] == ["3", "2.9", "MiB"]
    assert any(line.startswith("tokenize") for line in lines)


def test_cli_uses_grnx_cache_dir(cache, capsys, monkeypatch):
    monkeypatch.setenv("GRNX_CACHE_DIR", str(cache.root))
    assert main(["cache", "info"]) == 0
    assert f"cache: {cache.root}" in capsys.readouterr().out
    empty = cache.root.parent / "empty"
    assert main(["cache", "--cache-dir", str(empty), "info"]) == 0
    assert capsys.readouterr().out == f"cache: {empty}\nno entries\n"


def test_cli_clear_without_a_terminal_needs_yes(cache, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    assert main(["cache", "clear", "--cache-dir", str(cache.root)]) == 2
    err = capsys.readouterr().err
    assert "pass --yes" in err and "Traceback" not in err
    assert len(list(cache.entries())) == 3

    assert main(["cache", "clear", "--cache-dir", str(cache.root), "--older-than", "7d", "--yes"]) == 0
    assert capsys.readouterr().out.startswith("removed 1 entry (2.9 MiB) not used for 7d from ")
    assert {e.key for e in cache.entries()} == {"aa11", "cc33"}
    assert main(["cache", "clear", "--cache-dir", str(cache.root), "--stage", "model", "-y"]) == 0
    assert {e.key for e in cache.entries()} == {"cc33"}
    assert main(["cache", "clear", "--cache-dir", str(cache.root), "--stage", "model", "-y"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("nothing to remove of stage model in ")


def test_cli_clear_at_a_terminal_asks(cache, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", _Terminal("n\n"))
    assert main(["cache", "clear", "--cache-dir", str(cache.root), "--stage", "model"]) == 0
    out = capsys.readouterr().out
    assert "remove 2 entries (2.9 MiB) of stage model from " in out and "[y/N]" in out
    assert "nothing removed" in out
    assert len(list(cache.entries())) == 3

    monkeypatch.setattr("sys.stdin", _Terminal("y\n"))
    assert main(["cache", "clear", "--cache-dir", str(cache.root), "--stage", "model"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert {e.key for e in cache.entries()} == {"cc33"}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--older-than", "7x"], "--older-than: expected a duration such as 7d, 12h or 30m"),
        (["--older-than", "week"], "got 'week'"),
        (["--stage", "modle"], "Did you mean 'model'? Stages there: model, tokenize."),
    ],
)
def test_cli_clear_rejects_bad_arguments(cache, capsys, arguments, message):
    assert main(["cache", "clear", "--cache-dir", str(cache.root), "--yes", *arguments]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(list(cache.entries())) == 3
