"""The command line: its error paths fail before any scoring, with a message that says
what is wrong and where."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.score import main
from tests.helpers import (
    ckpt_member,
    prefect_free_env,
    read_only_folder,
    wait_until_no_servers,
    write_manifest,
    write_table,
)


@pytest.fixture(autouse=True)
def _use_test_server(prefect_harness: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the CLI at the session's test server, as a user with a server would."""
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))


@pytest.fixture()
def setup(tmp_path: Path, checkpoints: list[Path], features: list[str]) -> dict[str, object]:
    cols: dict[str, object] = {"id": np.arange(10)}
    for f in features:
        cols[f] = np.ones(10, np.float32)
    write_table(tmp_path / "in" / "p.parquet", cols)
    models = [ckpt_member(f"m{i}", p)
              for i, p in enumerate(checkpoints)]
    return {"tmp": tmp_path, "features": features, "models": models}


def _run(setup: dict[str, object], capsys: pytest.CaptureFixture[str], **manifest: object
         ) -> tuple[int, str]:
    tmp = setup["tmp"]
    assert isinstance(tmp, Path)
    data = {"id_column": "id", "features": setup["features"], "models": setup["models"]}
    data.update(manifest)
    path = write_manifest(tmp / "manifest.yaml", data)
    code = main(["--models", str(path), "--input", str(tmp / "in"), "--output",
                 str(tmp / "out")])
    err = capsys.readouterr().err
    assert not (tmp / "out" / "ensemble").exists()  # failed before scoring
    return code, err


@pytest.mark.parametrize(("member", "key", "value", "message"), [
    (1, "path", "/nowhere/model.ckpt", "model 'm1': no checkpoint at /nowhere/model.ckpt"),
    (2, "output", "logits:0", "model 'm2': output tensor 'logits:0' is not in the graph"),
    (2, "name", "m0", "duplicate model names: ['m0']"),
], ids=["missing checkpoint", "unknown tensor", "duplicate names"])
def test_a_wrong_model_entry_is_exit_2(setup, capsys, member: int, key: str, value: str,  # type: ignore[no-untyped-def]
                                       message: str) -> None:
    models = [dict(m) for m in setup["models"]]
    models[member][key] = value
    code, err = _run(setup, capsys, models=models)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_unreachable_server_is_exit_2_before_the_output_exists(setup: dict[str, object]
                                                               ) -> None:
    from flows.server import _free_port

    tmp = setup["tmp"]
    assert isinstance(tmp, Path)
    manifest = write_manifest(tmp / "manifest.yaml", {
        "id_column": "id", "features": setup["features"], "models": setup["models"]})
    url = f"http://127.0.0.1:{_free_port()}/api"  # nothing listens there
    env = prefect_free_env(tmp / "prefect-home", PREFECT_API_URL=url)
    proc = subprocess.run([sys.executable, "-m", "flows.score", "--models", str(manifest),
                           "--input", str(tmp / "in"), "--output", str(tmp / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"the Prefect server at {url} (PREFECT_API_URL) cannot be reached" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp / "out").exists()


def test_missing_feature_column(setup, capsys) -> None:  # type: ignore[no-untyped-def]
    code, err = _run(setup, capsys, features=[*setup["features"], "income"])
    assert code == 2
    assert "partition p.parquet lacks column(s) ['income']" in err


def _main(setup: dict[str, object], capsys: pytest.CaptureFixture[str], inp: Path, out: Path
          ) -> tuple[int, str]:
    tmp = setup["tmp"]
    assert isinstance(tmp, Path)
    manifest = write_manifest(tmp / "manifest.yaml", {
        "id_column": "id", "features": setup["features"], "models": setup["models"]})
    code = main(["--models", str(manifest), "--input", str(inp), "--output", str(out)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("where", ["the input", "its parent"])
def test_output_that_is_or_holds_the_input(setup, capsys, where: str) -> None:  # type: ignore[no-untyped-def]
    tmp = setup["tmp"]
    before = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
    out = tmp / "in" if where == "the input" else tmp
    code, err = _main(setup, capsys, tmp / "in", out)
    assert code == 2
    assert f"the output folder {out} {'is' if where == 'the input' else 'holds'} the input" in err
    assert "Traceback" not in err
    # No lock, staging or probe file was created anywhere (the manifest is the test's).
    after = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
    assert [p for p in after if p not in before] == [Path("manifest.yaml")]


def test_read_only_output(setup, capsys) -> None:  # type: ignore[no-untyped-def]
    tmp = setup["tmp"]
    with read_only_folder(tmp / "ro") as ro:
        code, err = _main(setup, capsys, tmp / "in", ro / "out")
    assert code == 2
    assert f"output folder {ro / 'out'} is not writable (Read-only file system)" in err
    assert "Traceback" not in err and "Errno" not in err


def test_empty_meta_file(setup, capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    models = [dict(m) for m in setup["models"]]
    prefix = Path(str(models[0]["path"]))
    broken = tmp_path / "broken"
    broken.mkdir()
    for part in prefix.parent.glob(f"{prefix.name}.*"):
        (broken / part.name).write_bytes(b"" if part.suffix == ".meta" else part.read_bytes())
    models[0]["path"] = str(broken / prefix.name)
    code, err = _run(setup, capsys, models=models)
    assert code == 2
    assert f"model 'm0': meta graph {broken / prefix.name}.meta is empty" in err


def test_truncated_checkpoint_names_tensorflows_cause(setup, capsys, tmp_path: Path  # type: ignore[no-untyped-def]
                                                      ) -> None:
    models = [dict(m) for m in setup["models"]]
    prefix = Path(str(models[1]["path"]))
    broken = tmp_path / "broken"
    broken.mkdir()
    for part in prefix.parent.glob(f"{prefix.name}.*"):
        data = part.read_bytes()
        (broken / part.name).write_bytes(data[:len(data) // 2] if ".data-" in part.name
                                         else data)
    models[1]["path"] = str(broken / prefix.name)
    code, err = _run(setup, capsys, models=models)
    assert code == 2
    assert f"model 'm1': cannot read checkpoint {broken / prefix.name}: " in err
    assert "Graph execution error:." not in err
    line = err.split("cannot read checkpoint", 1)[1].split(": ", 1)[1]
    assert len(line.split(". Check")[0]) > 10  # TensorFlow's own first line, not empty


def test_help_documents_every_option() -> None:
    out = subprocess.run([sys.executable, "-m", "flows.score", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for option in ("--models", "--input", "--output", "--ensemble", "--bad-rows", "--force",
                   "--concurrency", "--batch-size", "--runner", "--debug", "--min-members",
                   "--baseline", "bless --models"):
        assert option in out
    bless = subprocess.run([sys.executable, "-m", "flows.score", "bless", "--help"],
                           capture_output=True, text=True, check=True).stdout
    for option in ("--models", "--sample", "--rows", "--out", "golden_tolerance"):
        assert option in bless


def test_golden_mismatch_exits_2_before_scoring(setup, capsys) -> None:  # type: ignore[no-untyped-def]
    tmp = setup["tmp"]
    rng = np.random.default_rng(0)
    cols: dict[str, object] = {"id": np.arange(10)}
    for f in setup["features"]:
        cols[f] = rng.standard_normal(10).astype(np.float32)
    write_table(tmp / "in" / "p.parquet", cols)
    path = write_manifest(tmp / "manifest.yaml", {
        "id_column": "id", "features": setup["features"], "models": setup["models"]})
    assert main(["bless", "--models", str(path), "--sample", str(tmp / "in")]) == 0
    assert "Add to the manifest: golden: golden.parquet" in capsys.readouterr().out
    models = [dict(m) for m in setup["models"]]
    models[0]["path"], models[1]["path"] = models[1]["path"], models[0]["path"]
    code, err = _run(setup, capsys, models=models, golden="golden.parquet")
    assert code == 2
    assert "golden check failed" in err and "member 'm0' deviates" in err
    assert "Traceback" not in err


def test_member_left_out_within_quorum(setup, capsys) -> None:  # type: ignore[no-untyped-def]
    tmp = setup["tmp"]
    models = [dict(m) for m in setup["models"]]
    models[1]["path"] = "/nowhere/model.ckpt"
    path = write_manifest(tmp / "manifest.yaml", {
        "id_column": "id", "features": setup["features"], "models": models,
        "min_members": 2})
    code = main(["--models", str(path), "--input", str(tmp / "in"), "--output",
                 str(tmp / "out")])
    captured = capsys.readouterr()
    assert code == 0
    assert "warning: member m1 cannot be loaded" in captured.err
    assert "MISSING:        1 member(s) not loaded, columns null: m1" in captured.out


@pytest.mark.slow
def test_demo_runs_in_ephemeral_mode(tmp_path: Path) -> None:
    """``python -m flows.score`` with no arguments: builds the demo and prints a summary."""
    env = prefect_free_env(tmp_path / "prefect-home", XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "flows.score"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Ensemble table:" in proc.stdout and "Rows:           200,000" in proc.stdout
    assert "Members:        3 (seed0, seed1, seed2)" in proc.stdout
    assert "ensemble_score" in proc.stdout
    assert len(list((tmp_path / ".demo" / "output" / "ensemble").glob("*.parquet"))) == 4
    assert not wait_until_no_servers(tmp_path / "prefect-home")  # stopped with the CLI


@pytest.mark.slow
@pytest.mark.parametrize("how", ["Ctrl-C", "SIGTERM"])
def test_ctrl_c_stops_the_run_and_its_server(setup: dict[str, object], how: str) -> None:
    """Ctrl-C (SIGINT to the terminal's whole process group) or SIGTERM (to the CLI's pid,
    as ``kill`` or a supervisor sends it) mid-run: the CLI reports the run as stopped and
    exits within seconds, keeps the committed partitions, removes its lock and leaves no
    Prefect server behind. The server used to get the SIGINT too and stop, and the CLI
    then retried it for minutes before exiting; SIGTERM used to kill the CLI before it
    removed its lock."""
    tmp, features = setup["tmp"], setup["features"]
    assert isinstance(tmp, Path) and isinstance(features, list)
    manifest = _partitions_and_manifest(setup, tmp / "big", 40)  # far more than can be
    env = prefect_free_env(tmp / "prefect-home")  # scored before the interrupt
    out = tmp / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.score", "--models", str(manifest), "--input",
         str(tmp / "big"), "--output", str(out), "--concurrency", "1", "--batch-size", "256"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 300
        while not list((out / "ensemble").glob("*.parquet")):  # a partition is committed
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.2)
        if how == "Ctrl-C":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        interrupted = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - interrupted
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == (130 if how == "Ctrl-C" else 143), err[-3000:]
    assert ("interrupted" if how == "Ctrl-C" else "terminated (SIGTERM)") in err
    assert "committed partitions are kept" in err
    assert took < 60, f"took {took:.0f} s to exit after {how}"
    committed = sorted((out / "ensemble").glob("*.parquet"))
    assert 1 <= len(committed) < 40
    for path in committed:
        assert pq.read_metadata(path).num_rows == 50_000
    # The run record says what was kept, agreeing with the files; the lock is gone.
    record = json.loads((out / "_run.json").read_text())
    assert (record["status"], record["stopped_by"]) == (
        ("interrupted", "KeyboardInterrupt") if how == "Ctrl-C" else
        ("stopped", "TerminationSignal"))
    states = {rel: p["status"] for rel, p in record["partitions"].items()}
    assert sorted(r for r, st in states.items() if st == "committed") == [
        p.name for p in committed]
    assert set(states.values()) == {"committed", "pending"}
    assert not (out / ".lock").exists()
    assert not wait_until_no_servers(tmp / "prefect-home")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGTERM to another thread",
                                 "Ctrl-C then SIGTERM", "SIGTERM as the run completes",
                                 "SIGTERM to another thread as the run completes",
                                 "SIGTERM as the flow run ends"])
def test_stop_signals_as_partitions_finish(setup: dict[str, object], how: str) -> None:
    """Stop signals while partitions finish every few milliseconds: to the process, handed
    by the OS to another of its threads (it may pick any), two in a row, or after the
    last partition. The CLI ends well inside the 20-s grace (what is in flight finishes
    in milliseconds), its record agrees with the disk and the lock is gone. A signal
    raised wherever the main thread was once left a logging lock taken and the CLI hung
    for ever; one after the last partition left the record saying "running", and one
    handed to another thread as the run ended lost its result (the CLI waited 45 s and
    called the completed run interrupted)."""
    tmp = setup["tmp"]
    assert isinstance(tmp, Path)
    manifest = _partitions_and_manifest(setup, tmp / "many", 200, rows=200)
    out, log = tmp / "out", tmp / "cli.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.score", "--models", str(manifest), "--input",
             str(tmp / "many"), "--output", str(out)],
            env=prefect_free_env(tmp / "prefect-home"), stdout=sink, stderr=sink, text=True,
            preexec_fn=_default_sigint)
    completes = how.endswith(("as the run completes", "as the flow run ends"))
    mark = ("' - Finished in state Completed()" if how.endswith("flow run ends")
            else "ids across partitions" if completes else "[5/200]")
    try:
        deadline = time.monotonic() + 300
        while not any(mark in line and (how != "SIGTERM as the flow run ends"
                                        or "Flow run '" in line)
                      for line in log.read_text().splitlines()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.005)
        _send(proc.pid, how)
        signalled = time.monotonic()
        proc.wait(timeout=120)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
    err = log.read_text()
    record = json.loads((out / "_run.json").read_text())
    committed = sorted(p.name for p in (out / "ensemble").glob("*.parquet"))
    states = {rel: p["status"] for rel, p in record["partitions"].items()}
    assert sorted(r for r, st in states.items() if st == "committed") == committed, err[-3000:]
    assert not (out / ".lock").exists()
    assert took < 15, f"took {took:.0f} s to stop; the grace is for partitions in flight"
    if how == "SIGTERM as the flow run ends":  # after the record: the run stands
        assert (proc.returncode, record["status"]) == (0, "completed"), err[-3000:]
        assert "re-run to finish" not in err
        return
    if completes and proc.returncode == 0:
        assert record["status"] == "completed" and len(committed) == 200
        assert "came as the run was completing; it completed" in err
        return
    expected = {(143, "stopped")} | ({(130, "interrupted")} if how.startswith("Ctrl-C")
                                     else set())  # two at once: either may come first
    assert (proc.returncode, record["status"]) in expected, err[-3000:]
    assert set(states.values()) <= {"committed", "pending"}


def _send(pid: int, how: str) -> None:
    if how.startswith("SIGTERM to another thread"):
        tid = max(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
        assert ctypes.CDLL(None, use_errno=True).syscall(
            _SYS_TGKILL, pid, tid, signal.SIGTERM) == 0
        return
    if how.startswith("Ctrl-C"):
        os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)


_SYS_TGKILL = 234  # x86-64 Linux: a signal to one thread of a process


def _partitions_and_manifest(setup: dict[str, object], folder: Path, count: int,
                             rows: int = 50_000) -> Path:
    """``count`` partitions of ``rows`` random rows in ``folder``, and the setup's
    manifest."""
    tmp, features = setup["tmp"], setup["features"]
    assert isinstance(tmp, Path) and isinstance(features, list)
    rng = np.random.default_rng(count)
    for i in range(count):
        cols: dict[str, object] = {"id": np.arange(rows) + i * rows}
        for f in features:
            cols[f] = rng.standard_normal(rows).astype(np.float32)
        write_table(folder / f"part-{i:02d}.parquet", cols)
    return write_manifest(tmp / "manifest.yaml", {
        "id_column": "id", "features": features, "models": setup["models"]})


def _default_sigint() -> None:
    """In the child: SIGINT as in a terminal's foreground job. A test run started in the
    background (``nohup``, ``&``) inherits it ignored, and so would the CLI."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_a_stopped_force_rerun_says_which_files_are_still_the_earlier_runs(
        setup: dict[str, object]) -> None:
    """A ``--force`` re-run stopped midway: the files it replaced are committed, the ones
    it had not reached yet are the earlier run's ("kept", with their rows), and the rows
    on disk add up."""
    tmp, features = setup["tmp"], setup["features"]
    assert isinstance(tmp, Path) and isinstance(features, list)
    manifest = _partitions_and_manifest(setup, tmp / "data", 8)
    env = prefect_free_env(tmp / "prefect-home")
    out = tmp / "out"
    args = [sys.executable, "-m", "flows.score", "--models", str(manifest), "--input",
            str(tmp / "data"), "--output", str(out), "--quiet"]
    first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p: p.stat().st_mtime_ns for p in (out / "ensemble").glob("*.parquet")}
    rerun = subprocess.Popen([*args, "--force", "--concurrency", "1", "--batch-size", "256"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not any(p.stat().st_mtime_ns != t for p, t in before.items() if p.exists()):
            assert rerun.poll() is None and time.monotonic() < deadline, rerun.stderr
            time.sleep(0.1)
        os.kill(rerun.pid, signal.SIGTERM)
        _, err = rerun.communicate(timeout=120)
    finally:
        if rerun.poll() is None:
            rerun.kill()
    assert rerun.returncode == 143, err[-3000:]
    record = json.loads((out / "_run.json").read_text())
    assert record["status"] == "stopped"
    states = {rel: p["status"] for rel, p in record["partitions"].items()}
    replaced = {p.name for p, t in before.items() if p.stat().st_mtime_ns != t}
    assert {r for r, st in states.items() if st == "committed"} == replaced
    assert "kept" in states.values() and set(states.values()) <= {"committed", "kept",
                                                                   "pending"}
    on_disk = {p.name: pq.read_metadata(p).num_rows
               for p in (out / "ensemble").glob("*.parquet")}
    for rel, part in record["partitions"].items():
        if part["status"] in ("committed", "kept"):
            assert part["rows"] == on_disk[rel] == 50_000, rel
