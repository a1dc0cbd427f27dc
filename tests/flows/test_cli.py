"""The command line: its error paths fail before any scoring, with a message that says
what is wrong and where."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flows.score import main
from tests.helpers import write_manifest, write_table


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
    models = [{"name": f"m{i}", "path": str(p), "input": "features:0", "output": "score:0"}
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


def test_missing_checkpoint_file(setup, capsys) -> None:  # type: ignore[no-untyped-def]
    models = [dict(m) for m in setup["models"]]
    models[1]["path"] = "/nowhere/model.ckpt"
    code, err = _run(setup, capsys, models=models)
    assert code == 2
    assert "model 'm1': no checkpoint at /nowhere/model.ckpt" in err
    assert "Traceback" not in err


def test_unknown_tensor(setup, capsys) -> None:  # type: ignore[no-untyped-def]
    models = [dict(m) for m in setup["models"]]
    models[2]["output"] = "logits:0"
    code, err = _run(setup, capsys, models=models)
    assert code == 2
    assert "model 'm2': output tensor 'logits:0' is not in the graph" in err


def test_missing_feature_column(setup, capsys) -> None:  # type: ignore[no-untyped-def]
    code, err = _run(setup, capsys, features=[*setup["features"], "income"])
    assert code == 2
    assert "partition p.parquet lacks column(s) ['income']" in err


def test_duplicate_model_names(setup, capsys) -> None:  # type: ignore[no-untyped-def]
    models = [dict(m) for m in setup["models"]]
    models[2]["name"] = "m0"
    code, err = _run(setup, capsys, models=models)
    assert code == 2
    assert "duplicate model names: ['m0']" in err


def test_help_documents_every_option() -> None:
    out = subprocess.run([sys.executable, "-m", "flows.score", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for option in ("--models", "--input", "--output", "--ensemble", "--bad-rows", "--force",
                   "--concurrency", "--batch-size", "--runner", "--debug"):
        assert option in out


@pytest.mark.slow
def test_demo_runs_in_ephemeral_mode(tmp_path: Path) -> None:
    """``python -m flows.score`` with no arguments: builds the demo and prints a summary."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-m", "flows.score"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Ensemble table:" in proc.stdout and "Rows:           200,000" in proc.stdout
    assert "Members:        3 (seed0, seed1, seed2)" in proc.stdout
    assert "ensemble_score" in proc.stdout
    assert len(list((tmp_path / ".demo" / "output" / "ensemble").glob("*.parquet"))) == 4
    # Both processes recorded what they imported, for the next run to read ahead.
    lists = sorted(p.name.split("-")[1] for p in (tmp_path / "cache").rglob("imports-*.txt"))
    assert lists == ["cli", "server"]
