"""Start-up read-ahead: the list a run records, and prefetching from it, never failing the
run it is meant to speed up."""

from __future__ import annotations

import json.decoder
import os
from pathlib import Path

import pytest

from flows import prefetch


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_record_lists_imported_modules_files(cache_home: Path) -> None:
    prefetch.record("cli")
    path = prefetch.list_path("cli")
    assert path.parent.parent == cache_home
    files = path.read_text().splitlines()
    # json.decoder is imported above: its bytecode if it has some on disk, else its source.
    cached = json.decoder.__cached__
    expected = cached if cached and os.path.isfile(cached) else json.decoder.__file__
    assert expected in files
    assert all(f.endswith((".py", ".pyc")) and os.path.isfile(f) for f in files)


def test_record_rewrites_only_a_changed_list() -> None:
    prefetch.record("cli")
    path = prefetch.list_path("cli")
    first = path.stat().st_mtime_ns
    os.utime(path, ns=(first - 10**9, first - 10**9))  # an unchanged list keeps this mtime
    prefetch.record("cli")
    assert path.stat().st_mtime_ns == first - 10**9
    path.write_text("/stale/module.pyc\n")
    prefetch.record("cli")
    assert "/stale/module.pyc" not in path.read_text()


def test_roles_and_environments_have_their_own_lists() -> None:
    assert prefetch.list_path("cli") != prefetch.list_path("server")


def test_start_without_a_list_does_nothing() -> None:
    assert prefetch.start("cli") is None


def test_start_skips_missing_and_unreadable_entries(tmp_path: Path) -> None:
    real = tmp_path / "mod.pyc"
    real.write_bytes(b"\0" * 4096)
    path = prefetch.list_path("cli")
    path.parent.mkdir(parents=True)
    path.write_text(f"/no/such/file.pyc\n\n{tmp_path}\n{real}\n")
    thread = prefetch.start("cli")
    assert thread is not None
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_an_unwritable_cache_is_ignored(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    prefetch.record("cli")  # no exception: the run goes on without a list
    assert prefetch.start("cli") is None
