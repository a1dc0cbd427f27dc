"""The output folder: the tool touches only what it created, and never the input."""

from __future__ import annotations

from pathlib import Path

import pytest

from loaders.errors import OutputError
from tasks.storage import (
    check_output_apart,
    is_staging_name,
    output_lock,
    previous_name,
    remove_stale_staging,
    staged,
)
from tests.helpers import plant_user_files, read_only_folder


def test_stale_staging_clean_up_removes_only_its_own_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    user_files = plant_user_files(out)
    final = out / "ensemble" / "day=01" / "part.parquet"
    final.parent.mkdir(parents=True)
    ours = [previous_name(final), previous_name(out / "_run.json")]
    with pytest.raises(RuntimeError), staged(final) as tmp:  # a run killed mid-write
        tmp.write_text("partial")
        ours.append(tmp.with_name(tmp.name))
        raise RuntimeError
    left = [final.parent / f".{final.name}.ensemble-scoring-staging-{'a' * 32}.tmp"]
    for path in [*ours[:2], *left]:
        path.write_text("left by a killed run")
    assert all(is_staging_name(p.name) for p in [*ours, *left])
    assert not any(is_staging_name(p.name) for p in user_files)
    assert remove_stale_staging(out) == 3
    for path, text in user_files.items():
        assert path.read_text() == text
    assert not any(p.exists() for p in [*ours, *left])


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
