"""Models on S3 end to end: a TF1 checkpoint and a SavedModel there, beside a local
member, scored by the flow and the CLI (a manifest read from S3 is tested in
``tests/loaders/test_remote.py``)
against the real moto server of ``tests/conftest.py``; downloads counted with
``loaders.remote.DOWNLOADS`` (the flow's thread runner runs in this process)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pytest
import yaml

from flows.demo import build_mlp_checkpoint, mlp_reference, mlp_weights, numpy_mlp
from loaders import remote
from loaders.inspect import digest_files, resolve_model
from loaders.manifest import ModelSpec
from tasks.fs import s3_filesystem
from tests.helpers import (
    N_FEATURES,
    assert_matches_reference,
    read_dataset,
    save_tf2_saved_model,
)

COLUMNS = ("score_tf1", "score_sm", "score_local", "ensemble_score")


@pytest.fixture(autouse=True)
def _use_test_server(prefect_harness: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the CLI at the session's test server, as a user with a server would."""
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))


def _upload(local: Path, key: str) -> None:
    pafs.copy_files(str(local), key, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3_filesystem())


@pytest.fixture
def setup(tmp_path: Path, bucket: str, checkpoints: list[Path], features: list[str]
          ) -> dict[str, Any]:
    """Data and the manifest on local disk; a checkpoint and a SavedModel on S3."""
    from flows.demo import write_partitions

    data = tmp_path / "data"
    write_partitions(data, partitions=2, rows=400, n_features=N_FEATURES)
    ckpt = build_mlp_checkpoint(tmp_path / "src" / "fold0" / "model.ckpt-1200", seed=41,
                                n_features=N_FEATURES, hidden=(16, 8))
    _upload(ckpt.parent, f"{bucket}/models/fold0")
    weights = mlp_weights(43, N_FEATURES, (16, 8))
    _upload(save_tf2_saved_model(tmp_path / "src" / "sm", weights), f"{bucket}/models/sm")
    # A manifest on S3 names models on S3 only (loaders.manifest); this one, kept
    # locally, mixes them with a local member.
    manifest = {"id_column": "id", "features": features, "models": [
        {"name": "tf1", "path": f"s3://{bucket}/models/fold0/model.ckpt-1200",
         "input": "features:0", "output": "score:0"},
        {"name": "sm", "path": f"s3://{bucket}/models/sm"},
        {"name": "local", "path": str(checkpoints[0]), "input": "features:0",
         "output": "score:0"}]}
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(manifest))
    return {"data": data, "ckpt": ckpt, "weights": weights, "local": checkpoints[0],
            "features": features, "models": str(tmp_path / "models.yaml"),
            "cache": tmp_path / "cache", "out": tmp_path / "out"}


def _reference(setup: dict[str, Any], ckpt: Path) -> dict[int, tuple[float, ...]]:
    table = read_dataset(setup["data"])
    x = np.stack([table.column(f).to_numpy() for f in setup["features"]], axis=1)
    refs = np.stack([mlp_reference(ckpt, x), numpy_mlp(setup["weights"], x),
                     mlp_reference(setup["local"], x)], axis=1)
    return {i: (*r, r.mean()) for i, r in zip(table.column("id").to_pylist(), refs,
                                                strict=True)}


def test_missing_shard_fails_before_scoring(setup: dict[str, Any], bucket: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from flows.score import main

    s3_filesystem().delete_file(f"{bucket}/models/fold0/model.ckpt-1200.data-00000-of-00001")
    code = main(["--models", setup["models"], "--input", str(setup["data"]), "--output",
                 str(setup["out"]), "--model-cache", str(setup["cache"])])
    err = capsys.readouterr().err
    assert code == 2
    assert (f"model 'tf1': checkpoint s3://{bucket}/models/fold0/model.ckpt-1200 is "
            f"incomplete: object s3://{bucket}/models/fold0/model.ckpt-1200.data-00000-of-00001"
            " is missing") in err
    assert "Traceback" not in err
    assert not (setup["out"] / "ensemble").exists()
    assert not setup["cache"].exists()  # nothing downloaded


@pytest.mark.slow
def test_flow_scores_s3_members_once_and_rescores_only_a_replaced_one(
        setup: dict[str, Any], bucket: str) -> None:
    from flows.ensemble import score_ensemble
    from flows.params import ScoreParams
    from flows.records import RunSummary

    def run() -> tuple[RunSummary, int]:
        before = sum(remote.DOWNLOADS.values())
        summary = score_ensemble(ScoreParams(
            models=setup["models"], input=str(setup["data"]), output=str(setup["out"]),
            model_cache=str(setup["cache"]), batch_size=128))
        return summary, sum(remote.DOWNLOADS.values()) - before

    first, downloads = run()
    assert not first.failed and first.rows == 800 and downloads == 2
    table = read_dataset(setup["out"] / "ensemble")
    assert_matches_reference(table, _reference(setup, setup["ckpt"]), COLUMNS)
    # Provenance: the digest recorded is that of the same files on local disk.
    record = json.loads((setup["out"] / "_run.json").read_text())
    digests = {m["name"]: m["digest"] for m in record["members"]}
    local = ModelSpec(name="x", path=str(setup["ckpt"]), input="a", output="b")
    assert digests["tf1"] == digest_files(resolve_model(local).files)

    second, downloads = run()  # unchanged objects: nothing downloaded, nothing rescored
    assert downloads == 0 and second.skipped_member_partitions == 6

    other = build_mlp_checkpoint(setup["ckpt"].parent.parent / "other" / "model.ckpt-1200",
                                 seed=77, n_features=N_FEATURES, hidden=(16, 8))
    _upload(other.parent, f"{bucket}/models/fold0")
    third, downloads = run()  # exactly the replaced member is fetched and rescored
    assert downloads == 1 and third.skipped_member_partitions == 4
    table = read_dataset(setup["out"] / "ensemble")
    assert_matches_reference(table, _reference(setup, other), COLUMNS)


def _worker_downloads() -> dict[str, int]:
    """Run on each Dask worker: the downloads that process made."""
    from loaders import remote as worker_remote

    return dict(worker_remote.DOWNLOADS)


@pytest.mark.slow
def test_dask_workers_share_one_cache_folder(setup: dict[str, Any], dask_cluster: str) -> None:
    """Two worker processes (the ``dask_cluster`` fixture of ``tests/flows/conftest.py``, started
    after ``bucket`` set the AWS variables) load every member once from the cache folder
    the run names; one download per model in all processes."""
    from distributed import Client

    from flows.ensemble import score_ensemble
    from flows.params import ScoreParams

    before = sum(remote.DOWNLOADS.values())
    summary = score_ensemble(ScoreParams(
        models=setup["models"], input=str(setup["data"]), output=str(setup["out"]),
        model_cache=str(setup["cache"]), batch_size=128, runner="dask", address=dask_cluster))
    assert not summary.failed and summary.rows == 800
    assert_matches_reference(read_dataset(setup["out"] / "ensemble"),
                             _reference(setup, setup["ckpt"]), COLUMNS)
    with Client(dask_cluster, timeout=60) as client:
        per_worker = client.run(_worker_downloads)
    downloads = sum(remote.DOWNLOADS.values()) - before + sum(
        n for counts in per_worker.values() for n in counts.values())
    assert downloads == 2
    entries = [p for p in setup["cache"].iterdir() if p.name.startswith("s3-")]
    assert len(entries) == 2
    loads = json.loads((setup["out"] / "_run.json").read_text())["model_loads"]
    workers = {proc: per for proc, per in loads.items()
               if per and proc.split(":")[1] != str(os.getpid())}
    assert workers, "no partition was scored on a Dask worker"
    assert all(count == 1 for per in workers.values() for count in per.values())
