"""``python -m benchmarks.many_partitions``: what the flow's own host does besides scoring,
on an input of many small files: planning, the ids-across-partitions check and the run
report, each timed alone, after one real run of the CLI has committed the table.

String ids make every file's id range overlap every other's, the check's worst case.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from benchmarks.run import run_product
from flows.demo import build_mlp_checkpoint, feature_names

__all__ = ["main"]


def build(folder: Path, partitions: int, rows: int, features: int) -> Path:
    """``partitions`` files of ``rows`` rows with string ids, and a 2-member manifest."""
    manifest = folder / "manifest.yaml"
    if manifest.is_file():
        return manifest
    names = feature_names(features)
    rng = np.random.default_rng(0)
    for p in range(partitions):
        cols: dict[str, object] = {"id": pa.array([f"c-{p:04d}-{i:05d}" for i in range(rows)])}
        x = rng.standard_normal((rows, features)).astype(np.float32)
        for j, name in enumerate(names):
            cols[name] = x[:, j]
        path = folder / "data" / f"day={p // 100:02d}" / f"part-{p:04d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), path)
    models = [build_mlp_checkpoint(folder / "models" / f"m{i}" / "model.ckpt", seed=i,
                                   n_features=features, hidden=(16,)) for i in range(2)]
    manifest.write_text(yaml.safe_dump({
        "id_column": "id", "features": names,
        "models": [{"name": f"m{i}", "path": str(m.resolve()), "input": "features:0",
                    "output": "score:0"} for i, m in enumerate(models)]}))
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.many_partitions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--partitions", type=int, default=1000)
    p.add_argument("--rows", type=int, default=1000, help="rows per partition")
    p.add_argument("--workdir", type=Path, default=Path(".bench"))
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    folder = args.workdir / f"many-p{args.partitions}-r{args.rows}"
    manifest = build(folder, args.partitions, args.rows, 8)
    out = folder / "out"
    run = run_product(manifest, folder / "data", out, [])
    print(f"CLI run: {args.partitions} partitions x {args.rows} rows, whole process "
          f"{run['wall']:.1f} s, flow {run['flow']:.1f} s, peak RSS "
          f"{run['peak_rss'] / 2**30:.2f} GiB")

    from loaders.manifest import load_manifest
    from tasks.ids import find_repeated_ids
    from tasks.plan import make_plan

    spec = load_manifest(manifest)
    t = time.perf_counter()
    plan = make_plan(spec, str(folder / "data"), str(folder / "plan-out"))
    planning = time.perf_counter() - t
    files = {q.relpath: str(out / "ensemble" / q.relpath) for q in plan.partitions}
    t = time.perf_counter()
    repeated = find_repeated_ids(files, "id")
    ids = time.perf_counter() - t
    record = json.loads((out / "_run.json").read_text())
    print(f"planning (list, footers, fingerprints): {planning:.2f} s")
    print(f"ids across partitions ({args.partitions * args.rows:,} string ids, all ranges "
          f"overlapping): {ids:.2f} s, {repeated.count} repeated")
    timing = record["timing"]
    before = timing["first_batch_at"] - timing["flow_started_at"]
    after = timing["committed_at"] - timing["flow_started_at"] - before - record[
        "summary"]["scoring_seconds"]
    print(f"flow, before the first batch (plan, loads, guards): {before:.1f} s; scoring "
          f"{record['summary']['scoring_seconds']:.1f} s; after the last partition (id "
          f"check, report, artifacts, record): {after:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
