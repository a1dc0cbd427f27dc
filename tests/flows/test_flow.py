"""The whole flow under a real Prefect test server, on real checkpoints and Parquet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.demo import mlp_reference, mlp_weights, numpy_mlp
from flows.ensemble import score_ensemble
from flows.params import ScoreParams
from loaders.errors import PartitionsFailed
from tests.helpers import (
    N_FEATURES,
    ckpt_member,
    read_dataset,
    save_tf2_saved_model,
    write_manifest,
    write_table,
)

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _hive_data(root: Path, features: list[str]) -> dict[str, np.ndarray]:
    """Hive-partitioned input with string ids, extra columns, features out of order."""
    rng = np.random.default_rng(42)
    rows: dict[str, np.ndarray] = {}
    for day, n in (("2026-11-01", 700), ("2026-11-02", 300), ("2026-11-03", 1)):
        for part in range(2):
            x = rng.standard_normal((n, N_FEATURES)).astype(np.float32)
            ids = [f"{day}/{part}/{i}" for i in range(n)]
            cols: dict[str, object] = {"note": ["x"] * n}
            for j in reversed(range(N_FEATURES)):
                cols[features[j]] = x[:, j]
            cols["customer"] = ids
            write_table(root / f"day={day}" / f"part-{part}.parquet", cols)
            rows.update(zip(ids, x, strict=True))
    return rows


def test_mixed_formats_hive_string_ids(tmp_path: Path, checkpoints: list[Path],
                                       features: list[str]) -> None:
    weights = mlp_weights(99, N_FEATURES)
    save_tf2_saved_model(tmp_path / "models" / "tf2", weights)
    manifest = write_manifest(tmp_path / "models" / "manifest.yaml", {
        "id_column": "customer",
        "features": features,
        "models": [
            ckpt_member("ckpt_a", checkpoints[0]),
            {"name": "ckpt_b", "path": str(checkpoints[1]), "input": "features",
             "output": "score"},
            {"name": "saved", "path": "tf2"},  # relative to the manifest's folder
        ],
    })
    rows = _hive_data(tmp_path / "data", features)
    summary = score_ensemble(ScoreParams(models=str(manifest), input=str(tmp_path / "data"),
                                         output=str(tmp_path / "out")))
    assert summary.rows == len(rows) and summary.partitions == 6 and not summary.failed

    files = sorted(p.relative_to(tmp_path / "out" / "ensemble").as_posix()
                   for p in (tmp_path / "out" / "ensemble").rglob("*.parquet"))
    assert files == [f"day={d}/part-{p}.parquet" for d in ("2026-11-01", "2026-11-02",
                                                           "2026-11-03") for p in (0, 1)]
    table = read_dataset(tmp_path / "out" / "ensemble")
    assert table.column_names == ["customer", "score_ckpt_a", "score_ckpt_b", "score_saved",
                                  "ensemble_score", "ensemble_std", "n_members"]
    assert str(table.schema.field("score_saved").type) == "float"
    ids = table.column("customer").to_pylist()
    assert sorted(ids) == sorted(rows) and len(set(ids)) == len(ids)

    x = np.stack([rows[i] for i in ids])
    refs = np.stack([mlp_reference(checkpoints[0], x), mlp_reference(checkpoints[1], x),
                     numpy_mlp(weights, x)], axis=1)
    for k, name in enumerate(["ckpt_a", "ckpt_b", "saved"]):
        assert np.abs(table.column(f"score_{name}").to_numpy() - refs[:, k]).max() <= 1e-5
    assert np.abs(table.column("ensemble_score").to_numpy() - refs.mean(1)).max() <= 1e-5
    assert np.abs(table.column("ensemble_std").to_numpy() - refs.std(1)).max() <= 1e-5
    assert set(table.column("n_members").to_pylist()) == {3}
    assert (tmp_path / "out" / "_run.json").is_file()


def test_failed_partition_keeps_the_others_and_rerun_finishes(
        tmp_path: Path, checkpoints: list[Path], features: list[str]) -> None:
    manifest = write_manifest(tmp_path / "m.yaml", {
        "id_column": "id", "features": features,
        "models": [{"name": f"m{i}", "path": str(p), "input": "features", "output": "score"}
                   for i, p in enumerate(checkpoints)],
    })
    rng = np.random.default_rng(0)
    for p in range(3):
        cols: dict[str, object] = {"id": np.arange(p * 100, p * 100 + 100)}
        for f in features:
            cols[f] = rng.standard_normal(100).astype(np.float32)
        write_table(tmp_path / "in" / f"p{p}.parquet", cols)
    bad = tmp_path / "in" / "p1.parquet"
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[: len(good_bytes) // 3])
    params = ScoreParams(models=str(manifest), input=str(tmp_path / "in"),
                         output=str(tmp_path / "out"))
    with pytest.raises(PartitionsFailed, match=r"(?s)1 of 3 partition\(s\) failed.*p1.parquet"):
        score_ensemble(params)
    assert sorted(p.name for p in (tmp_path / "out" / "ensemble").glob("*.parquet")) == [
        "p0.parquet", "p2.parquet"]
    bad.write_bytes(good_bytes)
    summary = score_ensemble(params.model_copy(update={"batch_size": 64}))
    assert summary.skipped_member_partitions == 6  # p0 and p2 were not re-scored
    assert pq.read_table(tmp_path / "out" / "ensemble" / "p1.parquet").num_rows == 100
    # The user's batch size is the one used, and the record says so.
    record = json.loads((tmp_path / "out" / "_run.json").read_text())
    assert record["feed"] == {"rows": 64, "chosen_by": "user", "rates": {}, "half_rates": [],
                              "seconds": 0.0, "why": "--batch-size 64: each batch is fed whole",
                              "process": "", "members": [], "key": "", "probed_at": ""}
    assert record["params"]["batch_size"] == 64
    assert pq.read_metadata(tmp_path / "out" / "ensemble" / "p1.parquet").num_row_groups == 2


def test_ids_repeated_across_partitions_are_reported_not_merged(
        tmp_path: Path, checkpoints: list[Path], features: list[str]) -> None:
    """The same customers on two days: legitimate, so both days are scored and committed,
    and the run says which ids repeat (run record, summary warning)."""
    manifest = write_manifest(tmp_path / "manifest.yaml", {
        "id_column": "customer", "features": features,
        "models": [{"name": "a", "path": str(checkpoints[0]), "input": "features",
                    "output": "score"}],
    })
    rng = np.random.default_rng(5)
    for day, customers in (("01", [5, 1, 9, 3]), ("02", [2, 9, 4, 5, 7])):
        x = rng.standard_normal((len(customers), N_FEATURES)).astype(np.float32)
        cols: dict[str, object] = {f: x[:, j] for j, f in enumerate(features)}
        cols["customer"] = np.array(customers, dtype=np.int64)
        write_table(tmp_path / "data" / f"day={day}" / "p.parquet", cols)

    summary = score_ensemble(ScoreParams(models=str(manifest), input=str(tmp_path / "data"),
                                         output=str(tmp_path / "out")))
    assert summary.rows == 9 and summary.partitions == 2 and not summary.failed
    assert summary.repeated_ids.startswith("2 id(s) appear in more than one partition")
    assert summary.report is not None and summary.repeated_ids in summary.report.warnings
    record = json.loads((tmp_path / "out" / "_run.json").read_text())
    assert record["repeated_ids"] == {
        "count": 2, "examples": {"5": ["day=01/p.parquet", "day=02/p.parquet"],
                                 "9": ["day=01/p.parquet", "day=02/p.parquet"]},
        "sampled": 1}
    # The run record states which CPU path ran and what the loader rewrote for it.
    path = record["cpu_path"]
    assert path["cpu"] and set(path["flags"]) >= {"avx2", "avx512f", "avx512_bf16", "amx_tile"}
    assert path["onednn"] == path["fuses_matmul_add"]
    assert record["members"][0]["fused_bias_adds"] == (0 if path["fuses_matmul_add"] else 3)
    assert record["members"][0]["frozen_variables"] == (6 if path["onednn"] else 0)
    # Nine rows: the feed probe would cost more than it can save, so it did not run.
    assert record["feed"]["rows"] == 16_384 and record["feed"]["chosen_by"] == "default"
    assert "too small for the feed probe to pay" in record["feed"]["why"]
    for day, n in (("01", 4), ("02", 5)):
        assert pq.read_metadata(tmp_path / "out" / "ensemble" / f"day={day}" /
                                "p.parquet").num_rows == n


def test_a_probed_feed_is_kept_for_later_runs_until_what_it_depends_on_changes(
        tmp_path: Path, checkpoints: list[Path], features: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A run into the same output takes the feed the previous run's probe chose, without
    probing again, until a member changes; a record the user edited is only a reason to
    probe."""
    import flows.ensemble as ensemble

    monkeypatch.setattr(ensemble, "worth_probing", lambda rows, members: True)
    x = np.random.default_rng(8).standard_normal((50, N_FEATURES)).astype(np.float32)
    cols: dict[str, object] = {f: x[:, j] for j, f in enumerate(features)}
    cols["id"] = np.arange(50, dtype=np.int64)
    write_table(tmp_path / "in" / "p.parquet", cols)

    def run(models: list[Path]) -> dict[str, object]:
        manifest = write_manifest(tmp_path / "manifest.yaml", {
            "features": features, "id_column": "id",
            "models": [ckpt_member(f"m{i}", p) for i, p in enumerate(models)]})
        score_ensemble(ScoreParams(models=str(manifest), input=str(tmp_path / "in"),
                                   output=str(tmp_path / "out"), force=True))
        feed: dict[str, object] = json.loads((tmp_path / "out" / "_run.json").read_text())["feed"]
        return feed

    first = run(checkpoints[:2])
    assert first["chosen_by"] == "probe" and first["key"] and first["probed_at"]
    assert isinstance(first["seconds"], float) and first["seconds"] > 0
    second = run(checkpoints[:2])
    same = ("rows", "rates", "half_rates", "key", "probed_at", "process")
    assert second["chosen_by"] == "previous run"  # the same rates: nothing was timed
    assert {k: second[k] for k in same} == {k: first[k] for k in same}
    third = run([checkpoints[0], checkpoints[2]])  # another member: probed again
    assert third["chosen_by"] == "probe" and third["key"] != first["key"]
    record = json.loads((tmp_path / "out" / "_run.json").read_text())
    record["feed"]["rows"] = 123  # not a size the probe measures
    (tmp_path / "out" / "_run.json").write_text(json.dumps(record))
    assert run([checkpoints[0], checkpoints[2]])["chosen_by"] == "probe"
