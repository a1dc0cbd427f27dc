"""The deployments the Prefect way, end to end: a real ``prefect server start``, the
deployments of ``deployments/prefect.yaml``, a process worker, an ad-hoc run triggered
through the API, its table and its artifacts; the nightly schedule's upcoming runs; and
``python -m flows.score serve`` serving the same deployments without a work pool."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import numpy as np
import pytest
import yaml

from flows.report import ARTIFACT_KEYS
from tests.deployments.conftest import (
    DEMO_PARTITIONS,
    DEMO_ROWS,
    POOL,
    REPO_ROOT,
    PrefectStack,
)
from tests.helpers import read_dataset

pytestmark = pytest.mark.slow


def _artifacts(stack: PrefectStack, flow_run_id: str) -> dict[str, Any]:
    found = stack.api("POST", "/artifacts/filter", json={
        "artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).json()
    out = {}
    for a in found:
        data = a["data"]
        # Tables are stored as JSON text, progress as a number, markdown as text.
        out[a["key"]] = json.loads(data) if a["type"] == "table" else data
    return out


def test_adhoc_run_through_a_worker(stack: PrefectStack, adhoc_run: dict[str, Any]) -> None:
    run = adhoc_run["run"]
    assert run["state_type"] == "COMPLETED", f"{run['state']}\n{stack.logs()}"
    assert run["deployment_id"] == adhoc_run["deployment"]["id"]
    assert run["parameters"]["params"]["ensemble"] == "median"

    table = read_dataset(adhoc_run["output"] / "ensemble")
    names = ["seed0", "seed1", "seed2"]
    assert table.column_names == ["id", *(f"score_{n}" for n in names), "ensemble_score",
                                  "ensemble_std", "n_members"]
    assert table.num_rows == DEMO_PARTITIONS * DEMO_ROWS
    scores = np.stack([table.column(f"score_{n}").to_numpy() for n in names], axis=1)
    assert np.abs(table.column("ensemble_score").to_numpy() - np.median(scores, 1)).max() < 1e-6
    assert np.abs(table.column("ensemble_std").to_numpy() - scores.std(1)).max() < 1e-6

    artifacts = _artifacts(stack, run["id"])
    assert set(ARTIFACT_KEYS.values()) <= set(artifacts), sorted(artifacts)
    members = artifacts[ARTIFACT_KEYS["members"]]
    assert [m["member"] for m in members] == names
    assert all(m["rows"] == f"{table.num_rows:,}" and len(m["digest"]) == 16 for m in members)
    assert artifacts[ARTIFACT_KEYS["progress"]] == pytest.approx(100.0)
    assert str(adhoc_run["output"]) in artifacts[ARTIFACT_KEYS["summary"]]
    figures = {f["figure"]: f["value"] for f in artifacts[ARTIFACT_KEYS["figures"]]}
    assert figures["rows"] == f"{table.num_rows:,}" and figures["quarantined rows"] == "0"

    # One INFO line per partition, through the run logger, stored by the server (logs are
    # shipped in batches: the last ones may land after the state turns Completed).
    progress: list[dict[str, Any]] = []
    for _ in range(60):
        logs = stack.api("POST", "/logs/filter", json={
            "logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200}).json()
        progress = [g for g in logs if re.match(r"\[\d+/\d+\] ", g["message"])]
        if len(progress) >= DEMO_PARTITIONS:
            break
        time.sleep(0.5)
    assert len(progress) == DEMO_PARTITIONS, stack.logs()
    assert all(g["level"] == 20 for g in progress)


def test_deployments_as_declared(stack: PrefectStack, adhoc_run: dict[str, Any]) -> None:
    spec = {d["name"]: d for d in
            yaml.safe_load((REPO_ROOT / "deployments" / "prefect.yaml").read_text())[
                "deployments"]}
    for name in ("nightly", "adhoc"):
        d = stack.api("GET", f"/deployments/name/ensemble-score/{name}").json()
        assert d["work_pool_name"] == POOL
        assert d["entrypoint"] == "flows.ensemble:score_ensemble"
        assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {
            "directory": str(REPO_ROOT)}}]
        assert d["parameters"] == (spec[name].get("parameters") or {})
    adhoc = stack.api("GET", "/deployments/name/ensemble-score/adhoc").json()
    assert adhoc["schedules"] == []
    schema = adhoc["parameter_openapi_schema"]["definitions"]["ScoreParams"]["properties"]
    assert schema["concurrency"]["minimum"] == 1 and schema["input"]["description"]


def test_nightly_schedule_has_upcoming_runs(stack: PrefectStack,
                                            adhoc_run: dict[str, Any]) -> None:
    nightly = stack.api("GET", "/deployments/name/ensemble-score/nightly").json()
    [schedule] = nightly["schedules"]
    assert schedule["schedule"]["cron"] == "30 2 * * *"
    assert schedule["schedule"]["timezone"] == "Europe/Berlin" and schedule["active"]
    runs: list[dict[str, Any]] = []
    for _ in range(60):  # the server schedules runs when the deployment is created
        runs = stack.api("POST", "/flow_runs/filter", json={
            "deployments": {"id": {"any_": [nightly["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
            "sort": "EXPECTED_START_TIME_ASC"}).json()
        if runs:
            break
        time.sleep(1)
    assert runs, "no upcoming runs for the nightly deployment"
    now = datetime.now(ZoneInfo("UTC"))
    local_times = []
    for r in runs:
        start = datetime.fromisoformat(r["expected_start_time"].replace("Z", "+00:00"))
        local = start.astimezone(ZoneInfo("Europe/Berlin"))
        assert start > now
        local_times.append((local.hour, local.minute))
        assert r["parameters"]["params"]["bad_rows"] == "quarantine"
    # 02:30 Berlin time, whatever the UTC offset; on the one spring-forward night a year
    # 02:30 does not exist, so one run may fall an hour later.
    assert all(t in ((2, 30), (3, 30)) for t in local_times), local_times
    assert local_times.count((2, 30)) >= len(local_times) - 1, local_times


def test_wrong_parameters_are_rejected_with_a_message(stack: PrefectStack,
                                                      adhoc_run: dict[str, Any]) -> None:
    deployment_id = adhoc_run["deployment"]["id"]
    good = dict(adhoc_run["params"])
    for change, message in (({"concurrency": 0}, "0 is less than the minimum of 1"),
                            ({"ensemble": "max"}, "'max' is not one of"),
                            ({"bad_rows": "skip"}, "params.bad_rows")):
        resp = stack.api("POST", f"/deployments/{deployment_id}/create_flow_run",
                         json={"parameters": {"params": {**good, **change}}})
        assert resp.status_code == 409, resp.text
        assert message in resp.json()["detail"]


def _served(stack: PrefectStack, name: str, timeout: float = 120.0) -> httpx.Response:
    """The deployment ``name`` once ``serve`` has registered it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = stack.api("GET", f"/deployments/name/ensemble-score/{name}")
        if resp.status_code == 200:
            return resp
        time.sleep(0.5)
    raise AssertionError(f"serve registered nothing\n{stack.logs()}")


def test_serve_beside_the_deployed_deployments(stack: PrefectStack,
                                               adhoc_run: dict[str, Any]) -> None:
    """Serve on the server that holds the deployed deployments, stop it, then run the
    deployed ad-hoc deployment through the worker: nothing of it was touched."""
    before = stack.api("GET", "/deployments/name/ensemble-score/adhoc").json()
    serving = stack.start("serve-beside", sys.executable, "-m", "flows.score", "serve")
    try:
        local = _served(stack, "nightly-local")
        # The deployed nightly runs the schedule: the served one keeps it paused.
        assert not any(s["active"] for s in local.json()["schedules"])
        assert "schedule paused" in serving.log.read_text()
        # A second serve on the same server is refused while the first one polls: stopping
        # either would pause the other's deployments.
        for _ in range(120):
            if stack.api("GET", "/deployments/name/ensemble-score/adhoc-local").json().get(
                    "last_polled"):
                break
            time.sleep(0.5)
        second = subprocess.run([sys.executable, "-m", "flows.score", "serve"],
                                env=stack.env, capture_output=True, text=True, timeout=180)
        assert second.returncode == 2, second.stdout + second.stderr
        assert "served by another process right now" in second.stderr
    finally:
        serving.stop()
    for name in ("adhoc", "nightly"):
        after = stack.api("GET", f"/deployments/name/ensemble-score/{name}").json()
        assert after["work_pool_name"] == POOL and not after["paused"], after
        assert after["pull_steps"], after
    assert after["schedules"][0]["active"]
    adhoc = stack.api("GET", "/deployments/name/ensemble-score/adhoc").json()
    assert adhoc["id"] == before["id"] and adhoc["parameters"] == before["parameters"]
    created = stack.api("POST", f"/deployments/{adhoc['id']}/create_flow_run", json={
        "parameters": {"params": adhoc_run["params"] | {"force": True}}})
    assert created.status_code == 201, created.text
    run = stack.wait_for_run(created.json()["id"])
    assert run["state_type"] == "COMPLETED", f"{run['state']}\n{stack.logs()}"


def test_serve_registers_the_same_deployments_and_runs_them(
        tmp_path: Path) -> None:
    """``python -m flows.score serve`` on its own server: no work pool, schedule included."""
    from flows.demo import build_demo

    stack = PrefectStack(tmp_path / "stack")
    try:
        stack.start_server()
        # Started outside the repo: serve itself moves to the repo root.
        stack.start("serve", sys.executable, "-m", "flows.score", "serve", cwd=tmp_path)
        nightly: dict[str, Any] = {}
        for _ in range(120):
            resp = stack.api("GET", "/deployments/name/ensemble-score/adhoc-local")
            nightly = stack.api("GET", "/deployments/name/ensemble-score/nightly-local").json()
            if resp.status_code == 200 and nightly.get("schedules"):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"serve registered no deployments\n{stack.logs()}")
        assert nightly["work_pool_name"] is None
        assert nightly["schedules"][0]["schedule"]["cron"] == "30 2 * * *"
        assert nightly["schedules"][0]["schedule"]["timezone"] == "Europe/Berlin"
        assert nightly["parameters"]["params"]["models"] == ".demo/manifest.yaml"

        manifest = build_demo(tmp_path / "demo", partitions=1, rows=500)
        adhoc = resp.json()
        created = stack.api("POST", f"/deployments/{adhoc['id']}/create_flow_run", json={
            "parameters": {"params": {"models": str(manifest),
                                      "input": str(tmp_path / "demo" / "data"),
                                      "output": str(tmp_path / "out")}}})
        assert created.status_code == 201, created.text
        run = stack.wait_for_run(created.json()["id"])
        assert run["state_type"] == "COMPLETED", f"{run['state']}\n{stack.logs()}"
        assert read_dataset(tmp_path / "out" / "ensemble").num_rows == 500
        assert ARTIFACT_KEYS["members"] in _artifacts(stack, run["id"])
    finally:
        stack.stop_all()
    assert all(p.popen.poll() is not None for p in stack.procs)


def test_cancel_through_the_api_leaves_a_truthful_record(
        stack: PrefectStack, adhoc_run: dict[str, Any], tmp_path: Path) -> None:
    """Cancel a worker's run mid-way, as the UI's Cancel does: it reaches Cancelled in
    seconds, and its run record lists what is committed, agreeing with the files."""
    from flows.demo import build_demo

    manifest = build_demo(tmp_path / "demo", partitions=40, rows=40_000)
    out = tmp_path / "out"
    deployment = stack.api("GET", "/deployments/name/ensemble-score/adhoc").json()
    created = stack.api("POST", f"/deployments/{deployment['id']}/create_flow_run", json={
        "parameters": {"params": {"models": str(manifest), "input": str(manifest.parent /
                                  "data"), "output": str(out), "concurrency": 1,
                                  "batch_size": 1024}}})
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    deadline = time.monotonic() + 300
    while not list((out / "ensemble").glob("*.parquet")):
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.5)
    resp = stack.api("POST", f"/flow_runs/{run_id}/set_state",
                     json={"state": {"type": "CANCELLING"}, "force": True})
    assert resp.status_code in (200, 201), resp.text
    asked = time.monotonic()
    run = stack.wait_for_run(run_id, timeout=120)
    took = time.monotonic() - asked
    assert run["state_type"] == "CANCELLED", f"{run['state']}\n{stack.logs()}"
    assert took < 45, f"took {took:.0f} s to cancel"
    record = json.loads((out / "_run.json").read_text())
    assert record["status"] == "cancelled" and record["flow_run_id"] == run_id
    summary = _artifacts(stack, run_id)[ARTIFACT_KEYS["summary"]]
    assert "# Ensemble run: Cancelled" in summary, summary[:500]
    committed = sorted(p.name for p in (out / "ensemble").glob("*.parquet"))
    states = record["partitions"]
    assert sorted(r for r, p in states.items() if p["status"] == "committed") == committed
    assert 1 <= len(committed) < 40
    assert {p["status"] for p in states.values()} == {"committed", "pending"}
    assert not (out / ".lock").exists()


def test_ctrl_c_on_serve_cancels_its_run_with_a_record(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to serve's process group, run processes included) while a served
    run scores: serve stops the way it does on SIGTERM, the run ends Cancelled, and its
    record agrees with the files, with no lock left. Serve used to tear down at once and
    kill the run's process mid-record, leaving it Running with a stale lock."""
    from flows.demo import build_demo

    manifest = build_demo(tmp_path / "demo", partitions=40, rows=40_000)
    out = tmp_path / "out"
    stack = PrefectStack(tmp_path / "stack")
    try:
        stack.start_server()
        serving = stack.start("serve", sys.executable, "-m", "flows.score", "serve")
        resp = _served(stack, "adhoc-local")
        created = stack.api("POST", f"/deployments/{resp.json()['id']}/create_flow_run",
                            json={"parameters": {"params": {
                                "models": str(manifest), "input": str(manifest.parent / "data"),
                                "output": str(out), "concurrency": 1, "batch_size": 1024}}})
        assert created.status_code == 201, created.text
        deadline = time.monotonic() + 300
        while not list((out / "ensemble").glob("*.parquet")):
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.5)
        serving.stop(timeout=90)
        assert serving.popen.returncode is not None and serving.popen.returncode >= 0
        run = stack.wait_for_run(created.json()["id"], timeout=60)
        assert run["state_type"] == "CANCELLED", f"{run['state']}\n{stack.logs()}"
        record = json.loads((out / "_run.json").read_text())
        assert record["status"] in ("cancelled", "stopped", "interrupted"), record["status"]
        committed = sorted(p.name for p in (out / "ensemble").glob("*.parquet"))
        assert sorted(r for r, p in record["partitions"].items()
                      if p["status"] == "committed") == committed
        assert 1 <= len(committed) < 40
        assert not (out / ".lock").exists()
    finally:
        stack.stop_all()
