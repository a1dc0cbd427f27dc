"""The output folder: the tool touches only what it created, and never the input."""

from __future__ import annotations

from pathlib import Path

import pytest

from loaders.errors import OutputError
from tasks.storage import (
    check_output_apart,
    is_staging_name,
    output_lock,
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
        with pytest.raises(OutputError, match=r"--output .* (is|holds) the input .*outside"):
            check_output_apart(str(data), str(output))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    check_output_apart(str(data), str(tmp_path / "out"))  # a sibling: fine
    check_output_apart(str(data), str(data / "out"))  # inside: its files are left out
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
