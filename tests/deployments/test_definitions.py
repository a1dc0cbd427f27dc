"""deployments/prefect.yaml as declared, and ``serve`` building the same deployments from it
(fast: no server; the slow tests run them for real)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.params import ScoreParams
from flows.serve import REPO_ROOT, build_deployments, load_definitions, main


def test_prefect_yaml_declares_nightly_and_adhoc_on_a_process_pool() -> None:
    defs = {d["name"]: d for d in load_definitions()}
    assert set(defs) == {"nightly", "adhoc"}
    for d in defs.values():
        assert d["entrypoint"] == "flows.ensemble:score_ensemble"
        module, _, name = d["entrypoint"].partition(":")
        assert (REPO_ROOT / (module.replace(".", "/") + ".py")).is_file() and name
        assert d["work_pool"]["name"] == "ensemble" and d["description"]
    [cron] = defs["nightly"]["schedules"]
    assert cron == {"cron": "30 2 * * *", "timezone": "Europe/Berlin", "active": True}
    params = ScoreParams.model_validate(defs["nightly"]["parameters"]["params"])
    assert params.bad_rows == "quarantine" and params.models == ".demo/manifest.yaml"
    assert "schedules" not in defs["adhoc"] and "parameters" not in defs["adhoc"]


def test_serve_builds_the_same_deployments_under_its_own_names() -> None:
    deployments = {d.name: d for d in build_deployments()}
    defs = {d["name"]: d for d in load_definitions()}
    assert set(deployments) == {f"{name}-local" for name in defs}
    nightly = deployments["nightly-local"]
    [schedule] = nightly.schedules
    assert schedule.schedule.cron == "30 2 * * *"
    assert schedule.schedule.timezone == "Europe/Berlin"
    assert schedule.active
    assert nightly.parameters == defs["nightly"]["parameters"]
    assert nightly.tags == [*defs["nightly"]["tags"], "served"]
    adhoc = deployments["adhoc-local"]
    assert adhoc.schedules == [] and adhoc.parameters == {}
    # Where the deployed twin already runs the schedule, serving keeps its own paused.
    [paused] = {d.name: d for d in build_deployments(
        scheduled_elsewhere=frozenset({"nightly"}))}["nightly-local"].schedules
    assert not paused.active


def test_serve_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # serve moves to the repo root; monkeypatch moves back
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "ensemble-score/nightly-local: schedule 30 2 * * * (Europe/Berlin)" in out
    assert "ensemble-score/adhoc-local: no schedule" in out


def test_serve_refuses_a_file_with_another_flow(tmp_path: Path) -> None:
    path = tmp_path / "prefect.yaml"
    path.write_text("deployments:\n  - name: x\n    entrypoint: other.py:flow\n")
    with pytest.raises(ValueError, match="only the scoring flow is served"):
        build_deployments(path)
