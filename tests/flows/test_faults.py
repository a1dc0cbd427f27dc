"""Real faults: transient read errors, kill -9 mid-run, two runs on one folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.demo import build_demo
from flows.ensemble import score_ensemble
from flows.params import ScoreParams
from loaders.errors import OutputLocked
from tasks.storage import output_lock
from tests.helpers import (
    assert_output_matches,
    inject_read_faults,
    plant_user_files,
    reference_scores,
)

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_transient_read_errors_are_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    """A partition whose reads raise OSError twice once scoring starts, then work: the
    task is retried and completes."""
    manifest = build_demo(tmp_path / "demo", partitions=2, rows=2000)
    calls: dict[Path, int] = {}
    victim = (manifest.parent / "data" / "part-0001.parquet").resolve()  # not its output

    def flaky(path: Path) -> bool:
        if path == victim:
            calls[path] = calls.get(path, 0) + 1
            return calls[path] in (2, 3)  # the first read is the plan's footer check
        return False

    inject_read_faults(monkeypatch, flaky)
    out = tmp_path / "out"
    summary = score_ensemble(ScoreParams(models=str(manifest), input=str(manifest.parent /
                                                                          "data"),
                                         output=str(out), retries=3))
    assert summary.rows == 4000 and not summary.failed
    assert list(calls.values()) == [4]  # planned, two failures, then the third try read it
    assert_output_matches(out, reference_scores(manifest, manifest.parent / "data"))


def test_an_unreadable_table_for_the_id_check_costs_a_warning_not_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cross-partition id check reads committed files; if it cannot, the run still
    completes and says the check was not done."""
    import json

    manifest = build_demo(tmp_path / "demo", partitions=2, rows=500)
    out = tmp_path / "out"
    inject_read_faults(monkeypatch, lambda path: path.is_relative_to(out / "ensemble"))
    summary = score_ensemble(ScoreParams(models=str(manifest), input=str(manifest.parent /
                                                                          "data"),
                                         output=str(out), retries=0))
    assert summary.rows == 1000 and not summary.failed
    assert summary.repeated_ids.startswith("ids across partitions could not be checked")
    assert json.loads((out / "_run.json").read_text())["repeated_ids"] is None


def test_second_run_on_a_locked_folder_fails_at_once(tmp_path: Path) -> None:
    manifest = build_demo(tmp_path / "demo", partitions=1, rows=100)
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from tasks.storage import output_lock\n"
         f"with output_lock(Path({str(out)!r})):\n print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        with pytest.raises(OutputLocked, match=rf"output folder {out} is in use by another run "
                                               rf"\(pid {holder.pid} on .*choose another"):
            score_ensemble(ScoreParams(models=str(manifest), input=str(manifest.parent /
                                                                       "data"),
                                       output=str(out)))
        assert time.perf_counter() - t0 < 30
        assert not (out / "ensemble").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died (as with kill -9): the lock went with it.
    with output_lock(out):
        pass


def _cli(manifest: Path, out: Path, env: dict[str, str], batch_size: int = 8192
         ) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.score", "--models", str(manifest), "--input",
         str(manifest.parent / "data"), "--output", str(out), "--batch-size", str(batch_size),
         "--concurrency", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}


def _wait_for(predicate, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the run to get there"
        time.sleep(0.005)


def _visible(out: Path) -> list[Path]:
    return sorted(p for p in (out / "ensemble").rglob("*.parquet")
                  if not p.name.startswith(".")) if (out / "ensemble").exists() else []


@pytest.mark.slow
def test_kill_9_at_several_points_then_rerun(tmp_path: Path) -> None:
    manifest = build_demo(tmp_path / "demo", partitions=6, rows=150_000)
    ref = reference_scores(manifest, manifest.parent / "data")
    out = tmp_path / "out"
    env = _env()
    user_files = plant_user_files(out)

    def staging_present() -> bool:
        return any((out / "ensemble").rglob(".*.tmp")) if (out / "ensemble").exists() else False

    kill_points = [
        ("mid-write of the first partition", staging_present),
        ("after two partitions", lambda: len(_visible(out)) >= 2),
        ("after four partitions", lambda: len(_visible(out)) >= 4),
    ]
    for what, reached in kill_points:
        proc = _cli(manifest, out, env)
        try:
            _wait_for(lambda: reached() or proc.poll() is not None)  # noqa: B023
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate()
        # Whatever is visible is complete and correct; the rest is simply missing.
        for path in _visible(out):
            table = pq.read_table(path)
            assert table.num_rows == 150_000, what
            ids = table.column("id").to_pylist()
            assert all(i in ref for i in ids), what
    assert "pid" in (out / ".lock").read_text()  # left by the killed run
    if (out / "_run.json").exists():  # written as a run starts: never a stale "completed"
        assert json.loads((out / "_run.json").read_text())["status"] == "running"
    proc = _cli(manifest, out, env)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Reused:" in stdout
    assert "did not finish: it was killed" in stdout + stderr
    record = json.loads((out / "_run.json").read_text())
    assert record["status"] == "completed"
    assert "did not finish: it was killed" in record["summary"]["previous_run"]
    assert "did not finish: it was killed" in record["summary"]["report"]["warnings"][0]
    assert not (out / ".lock").exists()
    assert_output_matches(out, ref)
    assert sorted(p for p in out.rglob(".*.tmp") if p not in user_files) == []
    for path, text in user_files.items():  # the user's own files survived it all
        assert path.read_text() == text, path


@pytest.mark.slow
def test_two_runs_started_at_once(tmp_path: Path) -> None:
    manifest = build_demo(tmp_path / "demo", partitions=4, rows=150_000)
    out = tmp_path / "out"
    env = _env()
    first = _cli(manifest, out, env, batch_size=256)
    try:
        _wait_for(lambda: (out / ".lock").is_file()
                  and f"pid {first.pid}" in (out / ".lock").read_text())
        # The first run is paused while it holds the folder (its lock is held all the same),
        # so it cannot finish before the second has imported TensorFlow, however fast it
        # scores and however busy the machine is.
        first.send_signal(signal.SIGSTOP)
        try:
            second = _cli(manifest, out, env)
            _, err2 = second.communicate(timeout=300)
        finally:
            first.send_signal(signal.SIGCONT)
        _, err1 = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2  # nothing was scored
    assert f"is in use by another run (pid {first.pid}" in err2
    assert first.returncode == 0, err1[-3000:]
    assert_output_matches(out, reference_scores(manifest, manifest.parent / "data"))
