"""``python -m benchmarks.run``: the product against the hardware ceiling, in one run.

The ceiling is TensorFlow alone: every member in its own graph and session, features
already in memory, members running concurrently, only ``Session.run`` timed, best of a
few batch sizes. The product is ``python -m flows.score`` in a fresh process, with Prefect
in ephemeral mode, exactly as a user runs it. Both run on the same generated workload, so
their ratio is meaningful on a noisy machine where absolute seconds are not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.workload import Workload, build_workload

__all__ = ["main"]


def measure_ceiling(w: Workload, prefixes: list[Path], batch_sizes: list[int],
                    seconds: float) -> dict[str, Any]:
    """Row-model evaluations per second of the members' graphs alone, run concurrently."""
    from loaders.cache import load_scorer
    from loaders.manifest import ModelSpec

    scorers = [load_scorer(ModelSpec(name=f"m{i}", path=str(p), input="features:0",
                                     output="score:0"), w.features)
               for i, p in enumerate(prefixes)]
    rng = np.random.default_rng(1)
    results = {}
    for bs in batch_sizes:
        x = rng.standard_normal((bs, w.features), dtype=np.float32)
        for s in scorers:  # warm-up: first run of a shape pays for graph optimisation
            s.predict(x)
        counts = [0] * len(scorers)
        deadline = time.perf_counter() + seconds

        def loop(k: int, x: np.ndarray = x, deadline: float = deadline,
                 counts: list[int] = counts) -> None:
            s = scorers[k]
            while time.perf_counter() < deadline:
                s.session.run(s.output_tensor, {s.input_tensor: x})
                counts[k] += len(x)

        start = time.perf_counter()
        threads = [threading.Thread(target=loop, args=(k,)) for k in range(len(scorers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        results[bs] = sum(counts) / elapsed
    for s in scorers:
        s.close()
    best = max(results, key=lambda b: results[b])
    return {"rows_per_s_by_batch": results, "best_batch": best, "rate": results[best]}


def _rss_sampler(pid: int, stop: threading.Event, peak: list[int]) -> None:
    import psutil

    try:
        proc = psutil.Process(pid)
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(0.05)
    except psutil.Error:
        pass


def run_product(manifest: Path, data: Path, output: Path, extra: list[str]) -> dict[str, Any]:
    """Run the CLI in a fresh process, ephemeral Prefect, and read its run record."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    cmd = [sys.executable, "-m", "flows.score", "--models", str(manifest), "--input", str(data),
           "--output", str(output), "--force", "--quiet", *extra]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_rss_sampler, args=(proc.pid, stop, peak), daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.time() - t0
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"product run failed ({proc.returncode}):\n{out}\n{err[-4000:]}")
    record = json.loads((output / "_run.json").read_text())
    timing = record["timing"]
    return {
        "wall": wall,
        "flow": timing["committed_at"] - timing["flow_started_at"],
        "startup": timing["first_batch_at"] - t0,
        "peak_rss": peak[0],
        "model_loads": record["model_loads"],
        "rows": record["summary"]["rows"],
    }


def verify_sample(prefixes: list[Path], data: Path, output: Path, rows: int = 2000
                  ) -> float:
    """Max abs error of member and ensemble scores against numpy, on sampled rows."""
    import pyarrow.parquet as pq

    from flows.demo import feature_names, mlp_reference

    first = sorted(data.glob("*.parquet"))[0]
    table = pq.ParquetFile(first).read_row_group(0)
    n = min(rows, table.num_rows)
    feats = feature_names(table.num_columns - 1)
    x = np.stack([table.column(f).to_numpy()[:n] for f in feats], axis=1)
    ens = pq.ParquetFile(output / "ensemble" / first.name).read_row_group(0)
    assert ens.column("id").to_numpy()[:n].tolist() == table.column("id").to_numpy()[:n].tolist()
    refs = np.stack([mlp_reference(p, x) for p in prefixes], axis=1)
    errs = [np.abs(ens.column(f"score_m{k}").to_numpy()[:n] - refs[:, k]).max()
            for k in range(len(prefixes))]
    errs.append(np.abs(ens.column("ensemble_score").to_numpy()[:n] - refs.mean(1)).max())
    return float(max(errs))


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {mem:.0f} GiB, {cpu}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--partitions", type=int, default=16)
    p.add_argument("--rows-per-partition", type=int, default=1_000_000)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--hidden", default="256,256", help="hidden layer widths (default 256,256)")
    p.add_argument("--workdir", type=Path, default=Path(".bench"))
    p.add_argument("--ceiling-batches", default="16384,65536,262144")
    p.add_argument("--ceiling-seconds", type=float, default=6.0)
    p.add_argument("--product-args", default="", help="extra CLI arguments for flows.score")
    p.add_argument("--json", type=Path, default=None, help="where to write the figures "
                   "(default: WORKDIR/results.json)")
    p.add_argument("--update-md", action="store_true", help="rewrite BENCHMARKS.md")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    w = Workload(members=args.members, partitions=args.partitions, rows=args.rows_per_partition,
                 features=args.features, hidden=tuple(int(h) for h in args.hidden.split(",")))
    print(f"workload: {w.key} ({w.row_model_evals:,} row-model evaluations)", flush=True)
    t = time.perf_counter()
    manifest, data, prefixes = build_workload(w, args.workdir)
    print(f"  ready in {time.perf_counter() - t:.1f} s", flush=True)

    print("product: python -m flows.score (fresh process, ephemeral Prefect) ...", flush=True)
    product = run_product(manifest, data, args.workdir / "out" / w.key,
                          args.product_args.split())
    print("ceiling: members' graphs alone, features in memory ...", flush=True)
    ceiling = measure_ceiling(w, prefixes, [int(b) for b in args.ceiling_batches.split(",")],
                              args.ceiling_seconds)
    max_err = verify_sample(prefixes, data, args.workdir / "out" / w.key)

    evals = w.row_model_evals
    rate_process = evals / product["wall"]
    rate_flow = evals / product["flow"]
    c = ceiling["rate"]
    rows = [
        ("ceiling (Session.run only, best batch " f"{ceiling['best_batch']:,})",
         f"{c / 1e6:.2f} M/s", "1.00"),
        ("product, flow phase", f"{rate_flow / 1e6:.2f} M/s", f"{rate_flow / c:.2f}"),
        ("product, whole process", f"{rate_process / 1e6:.2f} M/s", f"{rate_process / c:.2f}"),
    ]
    print()
    print(f"{'row-model evaluations per second':58s} {'rate':>10s} {'vs ceiling':>10s}")
    for name, rate, ratio in rows:
        print(f"{name:58s} {rate:>10s} {ratio:>10s}")
    print()
    print(f"whole process wall time   {product['wall']:8.1f} s")
    print(f"flow time                 {product['flow']:8.1f} s")
    print(f"start-up (to first batch) {product['startup']:8.1f} s")
    print(f"peak RSS                  {product['peak_rss'] / 2**30:8.2f} GiB")
    print(f"model loads per checkpoint {sorted(product['model_loads'].values())}")
    print(f"max abs error vs numpy    {max_err:.2e} (sampled rows)")
    for bs, r in sorted(ceiling["rows_per_s_by_batch"].items()):
        print(f"  ceiling at batch {bs:>7,}: {r / 1e6:.2f} M/s")

    figures = {
        "workload": w.key, "row_model_evals": evals, "machine": _machine(),
        "ceiling": ceiling, "product": product,
        "ratio_flow": rate_flow / c, "ratio_process": rate_process / c,
        "max_abs_error": max_err,
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None
                                                            else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
    }
    out = args.json or args.workdir / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2, default=str))
    print(f"\nfigures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
