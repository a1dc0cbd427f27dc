"""The output folder: the tool touches only what it created, and never the input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loaders.errors import OutputError
from tasks.storage import (
    LOCK_FILE,
    MAX_JSON_BYTES,
    LocalStore,
    check_output_apart,
    is_staging_name,
    output_lock,
    read_json,
    remove_stale_staging,
    store_for,
)
from tests.helpers import plant_user_files, read_only_folder


def test_stale_staging_clean_up_removes_only_its_own_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    user_files = plant_user_files(out)
    store = store_for(out)
    # Files a killed run leaves: a staging copy and previous versions it had hidden.
    with store.staged("ensemble/day=01/part.parquet") as sink:
        sink.write(b"committed")
    with store.staged("_run.json") as sink:
        sink.write(b"{}")
    hidden = [store.hide("ensemble/day=01/part.parquet"), store.hide("_run.json")]
    assert all(h is not None for h in hidden)
    ours = [out / str(h) for h in hidden]
    ours.append(out / "ensemble" / "day=01" / f".part.parquet.ensemble-scoring-staging-"
                                                f"{'a' * 32}.tmp")
    ours[-1].write_text("left by a killed run")
    assert all(p.is_file() and is_staging_name(p.name) for p in ours)
    assert not any(is_staging_name(p.name) for p in user_files)
    assert remove_stale_staging(out) == 3
    for path, text in user_files.items():
        assert path.read_text() == text
    assert not any(p.exists() for p in ours)


def test_output_that_is_or_holds_the_input_is_refused_before_any_file(tmp_path: Path
                                                                      ) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for output in (data, tmp_path, Path(str(data) + "/")):
        with pytest.raises(OutputError, match=r"output folder .* (is|holds) the input .*outside"):
            check_output_apart(str(data), str(output))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    check_output_apart(str(data), str(tmp_path / "out"))  # a sibling: fine
    with pytest.raises(OutputError, match=r"is inside the input .*later runs would read"):
        check_output_apart(str(data), str(data / "out"))  # later runs would read its table
    with pytest.raises(OutputError, match="is inside the input"):
        check_output_apart(str(data / "**" / "*.parquet"), str(data / "out"))
    # A glob or a single file: not below the folder its files are read from, which a
    # later run on that folder would walk into.
    with pytest.raises(OutputError, match=rf"is inside {data}, the folder the input's glob "
                                          r"reads from \(a later run on that folder"):
        check_output_apart(str(data / "*.parquet"), str(data / "sub" / "out"))
    with pytest.raises(OutputError, match="the folder the input's glob reads from"):
        check_output_apart(str(data / "*.parquet"), str(data / "out"))
    check_output_apart(str(data / "*.parquet"), str(tmp_path / "out"))  # a sibling: fine
    (data / "a.parquet").write_bytes(b"x")
    with pytest.raises(OutputError, match=rf"is inside {data}, the folder the input file "
                                          "reads from"):
        check_output_apart(str(data / "a.parquet"), str(data / "sub" / "out"))
    check_output_apart(str(data / "a.parquet"), str(tmp_path / "out"))
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "b.parquet").write_bytes(b"x")
    (data / "b.parquet").symlink_to(tmp_path / "store" / "b.parquet")
    with pytest.raises(OutputError, match=rf"is inside {data}, the folder the input file"):
        check_output_apart(str(data / "b.parquet"), str(data / "out"))  # a link: its folder
    with pytest.raises(OutputError, match=r"is inside s3://bucket/data, the folder the input"):
        check_output_apart("s3://bucket/data/*.parquet", "s3://bucket/data/sub/out")
    with pytest.raises(OutputError, match=r"is inside s3://bucket/data, the folder the input "
                                          "file reads from"):
        check_output_apart("s3://bucket/data/a.parquet", "s3://bucket/data/out")
    check_output_apart("s3://bucket/data/*.parquet", "s3://bucket/out")
    check_output_apart("s3://bucket/data/a.parquet", "s3://bucket/out")
    with pytest.raises(OutputError, match="is inside the input"):
        check_output_apart("s3://bucket/data", "s3://bucket/data/out")
    with pytest.raises(OutputError, match="holds the input"):
        check_output_apart("s3://bucket/data/day=01", "s3://bucket/data")
    check_output_apart("s3://bucket/data", "s3://bucket/data-out")


def test_read_only_output_is_an_explained_error(tmp_path: Path) -> None:
    with read_only_folder(tmp_path / "ro") as ro, pytest.raises(
            OutputError, match=r"output folder .* is not writable \(Read-only file system\)"
    ), output_lock(ro / "out"):
        pass


def test_symlinked_output_subfolder_is_refused(tmp_path: Path) -> None:
    """An ensemble/ that links elsewhere would put the tool's writes and clean-up in a
    folder it did not create."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".mine.ensemble-scoring-staging-" f"{'b' * 32}.tmp").write_text("theirs")
    out = tmp_path / "out"
    out.mkdir()
    (out / "ensemble").symlink_to(elsewhere)
    with pytest.raises(OutputError, match=r"ensemble is a symbolic link"):
        store_for(out).check_writable()
    assert [p.name for p in elsewhere.iterdir()] == [
        f".mine.ensemble-scoring-staging-{'b' * 32}.tmp"]


def test_a_link_below_ensemble_is_never_written_through(tmp_path: Path) -> None:
    """OUT/ensemble/day=1 linking to the input's day=1 folder: the tool would have taken
    the input file for its committed output and moved it away."""
    data = tmp_path / "data" / "day=1"
    data.mkdir(parents=True)
    (data / "part-0000.parquet").write_text("the user's input")
    out = tmp_path / "out"
    (out / "ensemble").mkdir(parents=True)
    (out / "ensemble" / "day=1").symlink_to(data)
    store = store_for(out)
    for step in (lambda: store.hide("ensemble/day=1/part-0000.parquet"),
                 lambda: store.delete("ensemble/day=1/part-0000.parquet"),
                 lambda: store.staged("ensemble/day=1/part-0000.parquet").__enter__()):
        with pytest.raises(OutputError, match=r"ensemble/day=1 is a symbolic link"):
            step()
    assert (data / "part-0000.parquet").read_text() == "the user's input"


def test_a_lock_file_that_is_a_link_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "config.txt"
    victim.write_text("IMPORTANT USER DATA")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    with pytest.raises(OutputError, match=r"\.lock is a symbolic link"), output_lock(out):
        pass
    assert victim.read_text() == "IMPORTANT USER DATA"


def test_a_read_only_ensemble_folder_is_found_before_scoring(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with read_only_folder(out / "ensemble") as ro, pytest.raises(
            OutputError, match=rf"output folder {ro} is not writable"):
        store_for(out).check_writable()


def test_a_glob_input_inside_the_output_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "p.parquet").write_text("x")
    (tmp_path / "data" / "ensemble").mkdir()
    (tmp_path / "data" / "ensemble" / "q.parquet").write_text("the tool's own output")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match=r"holds input files the glob matches, such as "
                                          r"data/p\.parquet"):
        check_output_apart("dat?/*.parquet", "data")
    with pytest.raises(OutputError, match="holds the folder the input's glob reads from"):
        check_output_apart("dat?/ensemble/*.parquet", "data")  # later runs would read it
    with pytest.raises(OutputError, match="is the folder the input's glob reads from"):
        check_output_apart("dat?/*.parquet", "datb")
    check_output_apart("dat?/*.parquet", "out")


@pytest.mark.parametrize("kind", ["hard link", "special file"])
def test_a_lock_file_that_is_not_the_tools_is_left_alone(tmp_path: Path, kind: str) -> None:
    victim = tmp_path / "config.txt"
    victim.write_text("IMPORTANT USER DATA")
    out = tmp_path / "out"
    out.mkdir()
    if kind == "hard link":
        os.link(victim, out / ".lock")
    else:
        os.mkfifo(out / ".lock")
    with pytest.raises(OutputError, match=rf"\.lock is not this tool's lock file \(a {kind}\)"), \
            output_lock(out):
        pass
    assert victim.read_text() == "IMPORTANT USER DATA"


def test_clean_up_never_deletes_through_a_link(tmp_path: Path) -> None:
    """A staging-named file in a folder that ensemble/ or quarantine/ links to belongs to
    whatever that folder is (another run's, still being written)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    theirs = elsewhere / f".p.parquet.ensemble-scoring-staging-{'c' * 32}.tmp"
    theirs.write_text("another run's")
    out = tmp_path / "out"
    (out / "ensemble").mkdir(parents=True)
    (out / "quarantine").mkdir()
    (out / "ensemble" / "day=1").symlink_to(elsewhere)
    (out / "quarantine" / "day=1").symlink_to(elsewhere)
    remove_stale_staging(out)
    assert theirs.read_text() == "another run's"


def test_a_record_that_is_no_regular_file_too_large_or_too_deep_reads_as_unreadable(
        tmp_path: Path) -> None:
    """Run records in the output folder are the user's files: a FIFO in their place must
    not block the run on open, and JSON nested deeper than Python's stack is refused as
    unreadable (ValueError), like any other bad record, not as a crash."""
    fifo = tmp_path / "_run.json"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        read_json(str(fifo))
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(ValueError, match="not a regular file"):
        read_json(str(tmp_path / "dir.json"))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        read_json(str(deep))
    with pytest.raises(FileNotFoundError):
        read_json(str(tmp_path / "missing.json"))
    link = tmp_path / "link.json"
    link.symlink_to(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        read_json(str(link))
    huge = tmp_path / "huge.json"
    with huge.open("wb") as f:
        f.truncate(MAX_JSON_BYTES + 1)  # sparse: nothing written
    with pytest.raises(ValueError, match="is over 64 MiB"):
        read_json(str(huge))


def test_a_lock_file_left_by_a_stop_is_removed_only_when_this_process_wrote_it(
        tmp_path: Path) -> None:
    """A stop signal raised while the lock is released can leave the file behind with this
    process's text (the next run would report a killed run): the CLI removes it then,
    and nothing else: not a lock still held, not another run's file."""
    store = store_for(tmp_path / "out")
    assert isinstance(store, LocalStore)
    lock = tmp_path / "out" / LOCK_FILE
    assert not store.remove_own_lock()  # this process never took it
    with store.lock():
        text = lock.read_bytes()
        assert not store.remove_own_lock() and lock.exists()  # held
    lock.write_bytes(text)  # as a stop between the release's steps leaves it
    assert store.remove_own_lock() and not lock.exists()
    lock.write_bytes(b"pid 1 on elsewhere, started 2026-11-30 05:00:00 UTC")
    assert not store.remove_own_lock() and lock.exists()  # another run's
