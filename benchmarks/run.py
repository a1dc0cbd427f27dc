"""``python -m benchmarks.run``: the product against the hardware ceiling, in one run.

The ceiling is TensorFlow alone: every member in its own graph and session, features
already in memory, members running concurrently, only ``Session.run`` timed, best of
three session thread configurations and a few batch sizes, on the graphs as saved. The
product changes the graphs at load where that pays: with oneDNN on it freezes the
variables into constants (``loaders/freeze.py``), and with it off, where TensorFlow does
not fuse ``MatMul + bias`` itself, it rewrites those adds (``loaders/rewrite.py``). Both
make TensorFlow's own work faster; the same is measured on the product's graphs, so the
report shows both what the product gains in TensorFlow and what its pipeline (decode,
write, Prefect) costs.
Every run states the CPU path it measured (CPU model and flags, oneDNN on or off, the
rewrites applied) and how much of the CPU other processes took meanwhile. The product is
``python -m flows.score`` in a fresh process, with Prefect in ephemeral mode, exactly as a
user runs it. Both run on the same generated workload, so
their ratio is meaningful on a noisy machine where absolute seconds are not.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import itertools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.workload import Workload, build_workload
from loaders.feed import FeedChoice

__all__ = ["main"]


THREADS: tuple[str, ...] = ("shared", "per-session", "per-session-1")


def measure_ceiling(w: Workload, prefixes: list[Path], batch_sizes: list[int],
                    seconds: float, rounds: int = 3, threads: tuple[str, ...] = THREADS,
                    fused_job: tuple[str, int] | None = None) -> dict[str, Any]:
    """Row-model evaluations per second of the members' graphs alone, run concurrently,
    at the best of their sessions' thread configurations and of ``batch_sizes``.

    The ceiling is the graphs as saved. The same is measured on the graphs as the product
    loads them (variables frozen with oneDNN on, ``MatMul + bias`` rewritten where
    TensorFlow does not fuse it itself, ``loaders.cpu``), so the report can tell the
    product's speed-up of TensorFlow's own work from its pipeline's overhead; where the
    product changes nothing, the two are the same graphs and are measured once. Every thread
    configuration in ``threads`` (``loaders.base.SESSION_THREADS``: the process-wide
    pools, per-session pools, one-thread per-session pools) gets its own sessions, all
    in this one process, and is measured at every size in ``batch_sizes``; with
    ``fused_job`` (the product's graphs' best (threads, size) in an earlier call), the
    product's graphs at that one only.

    Each (threads, size) gets ``seconds`` in all, split over ``rounds`` interleaved
    windows (jobs in turn, the order reversed every other round). Measured one after the
    other, a drift in the machine's speed (up to 15 % between 6-s windows here) favours
    whichever runs in a fast moment, and the best of such single windows overstates the
    ceiling.
    """
    from loaders.base import session_threads
    from loaders.cache import load_scorer
    from loaders.manifest import ModelSpec
    from tasks.features import aligned_matrix

    def load(as_saved: bool, config: Any) -> list[Any]:
        """The members as saved (no load-time change at all), or as the product loads them
        (``MatMul + bias`` rewritten where TensorFlow does not fuse it, variables frozen
        where oneDNN runs them)."""
        with session_threads(config):
            return [load_scorer(ModelSpec(name=f"m{i}", path=str(p), input="features:0",
                                          output="score:0"), w.features,
                                fuse=False if as_saved else None,
                                freeze=False if as_saved else None)
                    for i, p in enumerate(prefixes)]

    fused_jobs = ([fused_job] if fused_job else
                  [(th, bs) for th in threads for bs in batch_sizes])
    forms: dict[tuple[str, str], list[Any]] = {("saved", th): load(True, th) for th in threads}
    for th in dict.fromkeys(th for th, _ in fused_jobs):
        forms["fused", th] = load(False, th)
    product_form = forms["fused", fused_jobs[0][0]][0]
    # Where the product changes nothing at load, the two are the same graphs: measured once.
    rewrites = bool(product_form.fused_bias_adds or product_form.frozen_variables)
    if not rewrites:
        for th in dict.fromkeys(th for th, _ in fused_jobs):
            for s in forms.pop(("fused", th)):
                s.close()
    rng = np.random.default_rng(1)
    inputs = {}  # aligned as the product's feeds are, so neither side pays a feed copy
    for bs in dict.fromkeys([*batch_sizes, *(bs for _, bs in fused_jobs)]):
        inputs[bs] = aligned_matrix(bs, w.features)
        inputs[bs][:] = rng.standard_normal((bs, w.features), dtype=np.float32)
    for x in inputs.values():
        for scorers in forms.values():  # warm-up: the first run of a shape pays extra;
            for s in scorers:  # fed whole, as timed
                s.session.run(s.output_tensor, {s.input_tensor: x})
    jobs = [("saved", th, bs) for th in threads for bs in batch_sizes]
    if rewrites:
        jobs += [("fused", th, bs) for th, bs in fused_jobs]
    rows = dict.fromkeys(jobs, 0)
    elapsed = dict.fromkeys(jobs, 0.0)

    def window(scorers: list[Any], x: np.ndarray, window_seconds: float) -> tuple[int, float]:
        counts = [0] * len(scorers)
        deadline = time.perf_counter() + window_seconds

        def loop(k: int) -> None:
            s = scorers[k]
            while time.perf_counter() < deadline:
                s.session.run(s.output_tensor, {s.input_tensor: x})
                counts[k] += len(x)

        start = time.perf_counter()
        workers = [threading.Thread(target=loop, args=(k,)) for k in range(len(scorers))]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        return sum(counts), time.perf_counter() - start

    rounds = rounds if len(jobs) > 1 else 1
    steal = StealMeter()
    span_start = time.time()
    for r in range(rounds):
        for form, th, bs in jobs if r % 2 == 0 else jobs[::-1]:
            n, t = window(forms[form, th], inputs[bs], seconds / rounds)
            rows[form, th, bs] += n
            elapsed[form, th, bs] += t
    for scorers in forms.values():
        for s in scorers:
            s.close()
    saved = {(th, bs): rows["saved", th, bs] / elapsed["saved", th, bs]
             for _, th, bs in jobs if _ == "saved"}
    fused = ({(th, bs): rows["fused", th, bs] / elapsed["fused", th, bs]
              for th, bs in fused_jobs} if rewrites
             else {job: saved[job] for job in fused_jobs})
    best = max(saved, key=lambda j: saved[j])
    best_fused = max(fused, key=lambda j: fused[j])
    return {"rows_per_s": {f"{th} {bs}": r for (th, bs), r in saved.items()},
            "best": best, "best_batch": best[1], "best_threads": best[0],
            "rate": saved[best],
            "fused_rows_per_s": {f"{th} {bs}": r for (th, bs), r in fused.items()},
            "fused_best": best_fused, "fused_rate": fused[best_fused],
            "fused_bias_adds": product_form.fused_bias_adds,
            "frozen_variables": product_form.frozen_variables,
            "steal": steal.share(), "foreign": steal.foreign(),
            "span": (span_start, time.time())}


def matmul_reference(w: Workload, seconds: float = 2.0) -> dict[str, float]:
    """float32 matrix-multiply rate of numpy's BLAS on every core, and the MLP rate it
    would allow: a yardstick for the ceiling itself, independent of TensorFlow.

    The MLP's work is its matrix products (2 * sum of in * out FLOPs per row and member);
    a ceiling near this rate means TensorFlow leaves little on the table, so the ratios
    below measure the product against the machine, not against a slow baseline.
    """
    rng = np.random.default_rng(2)
    width = max(w.hidden)
    a = rng.standard_normal((16_384, width), dtype=np.float32)
    b = rng.standard_normal((width, width), dtype=np.float32)
    out = np.matmul(a, b)  # warm-up: BLAS starts its threads
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        np.matmul(a, b, out=out)
        n += 1
    flops = 2.0 * a.shape[0] * width * width * n / (time.perf_counter() - start)
    dims = [w.features, *w.hidden, 1]
    per_eval = 2.0 * sum(i * o for i, o in itertools.pairwise(dims))
    return {"gflops": flops / 1e9, "mlp_rate": flops / per_eval}


# The probe's work: ten 256 x 256 float32 matrix products on one thread, timed in thread
# CPU time (so waiting for a core does not count), every ``interval`` seconds, for as long
# as the process that started it lives.
_PROBE_CODE = """\
import os, sys, time
import numpy as np

a = np.random.default_rng(0).random((256, 256), dtype=np.float32)
interval, parent = float(sys.argv[2]), int(sys.argv[3])
with open(sys.argv[1], "a", buffering=1) as out:
    while os.getppid() == parent:  # ends with the benchmark, even on kill -9
        start = time.thread_time()
        for _ in range(10):
            a @ a
        out.write(f"{time.time():.3f} {(time.thread_time() - start) * 1e3:.4f}\\n")
        time.sleep(interval)
"""


class SpeedProbe:
    """The machine's own speed over time, from a fixed piece of work timed in a process of
    its own (~0.4 % of a 2-core machine at the default interval).

    This VM's speed moves by several percent within a minute, and the ceiling windows
    just before and after a 60-s product run cannot see what it was during the run: a
    process that shares nothing with the product slowed down with it (BENCHMARKS.md).
    Each run is reported with the probe's speed during its flow phase against its
    ceiling windows; the ratios themselves are not adjusted. Its CPU counts as the
    benchmark's own, not as other processes'.
    """

    def __init__(self, path: Path, interval: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        self.path = path
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _PROBE_CODE, str(path), str(interval), str(os.getpid())],
            env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def cpu(self) -> float:
        """CPU seconds the probe has used so far (0 once it is gone)."""
        import psutil

        try:
            times = psutil.Process(self.process.pid).cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)

    def median_ms(self, span: tuple[float, float]) -> float | None:
        """The probe's median time for its work within ``span`` (epoch seconds)."""
        times = []
        with contextlib.suppress(OSError):
            for line in self.path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and span[0] <= float(parts[0]) <= span[1]:
                    times.append(float(parts[1]))
        return float(np.median(times)) if times else None

    def speed(self, run: tuple[float, float], around: list[tuple[float, float]]
              ) -> float | None:
        """The machine's speed during ``run`` relative to the windows ``around`` it (below
        1: slower during the run), or None when a span holds no probe sample."""
        inside = self.median_ms(run)
        outside = [self.median_ms(span) for span in around]
        if inside is None or any(ms is None for ms in outside):
            return None
        return float(np.mean([ms for ms in outside if ms is not None])) / inside

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


_PROBE: SpeedProbe | None = None


def _cpu_jiffies() -> tuple[int, int, int]:
    """(stolen, busy, total) CPU time of the machine so far, from /proc/stat, in clock
    ticks; busy is everything but idle and iowait, steal included. (0, 0, 0) elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0, 0
    fields = (fields + [0] * 8)[:8]
    total = sum(fields)
    return fields[7], total - fields[3] - fields[4], total


def _own_cpu() -> float:
    """CPU seconds of this process, its waited-for children and its speed probe."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN))
               ) + (_PROBE.cpu() if _PROBE is not None else 0.0)


class StealMeter:
    """Share of the machine's CPU time that went elsewhere meanwhile: to other guests
    (steal) and to other processes on this machine (foreign).

    On a shared VM these are the visible reasons a run is slower than the one before it;
    they are reported next to each run and ceiling window, so a low ratio can be told from
    a busy neighbour. Foreign time counts the benchmark's own process and the children it
    has waited for as its own.
    """

    def __init__(self) -> None:
        self.start = _cpu_jiffies()
        self.own = _own_cpu()

    def share(self) -> float:
        stolen, _, total = _cpu_jiffies()
        return (stolen - self.start[0]) / max(1, total - self.start[2])

    def foreign(self, also_own: float = 0.0) -> float:
        """``also_own``: CPU seconds of processes of the measured run that this process
        has not waited for (the CLI's own Prefect server, which it does not wait for)."""
        _, busy, total = _cpu_jiffies()
        if total <= self.start[2]:
            return 0.0
        hz = os.sysconf("SC_CLK_TCK")
        others = (busy - self.start[1]) / hz - (_own_cpu() - self.own) - also_own
        return max(0.0, others / ((total - self.start[2]) / hz))


def wait_quiet(limit: float = 0.05, patience: float = 300.0, sample: float = 2.0) -> float:
    """Wait until other processes use less than ``limit`` of the machine's CPU over a
    ``sample``-second window (at most ``patience`` seconds); returns the seconds waited.

    The benchmark machine is shared: a test suite started by someone else took 25-45 % of
    the CPU during ceiling windows and product runs here, and made one product run look
    0.6 of the ceiling. Each measured phase starts on a quiet machine, and what other
    processes took during it is reported next to it (``StealMeter.foreign``).
    """
    start = time.perf_counter()
    while time.perf_counter() - start < patience:
        meter = StealMeter()
        time.sleep(sample)
        if meter.foreign() + meter.share() < limit:
            break
    return time.perf_counter() - start - sample


def _rss_sampler(pid: int, stop: threading.Event, peak: list[int],
                 descendants: dict[int, float]) -> None:
    """Peak RSS of ``pid``; last CPU seconds seen of each of its descendants."""
    import psutil

    try:
        proc = psutil.Process(pid)
        tick = 0
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            # Descendants once a second: listing them scans every process on the machine,
            # which at the RSS sampling rate took CPU from the run being measured.
            if tick % 20 == 0:
                for child in proc.children(recursive=True):
                    try:
                        times = child.cpu_times()
                        descendants[child.pid] = times.user + times.system
                    except psutil.Error:
                        pass
            tick += 1
            stop.wait(0.05)
    except psutil.Error:
        pass


def run_product(manifest: Path, data: Path | str, output: Path, extra: list[str]
                ) -> dict[str, Any]:
    """Run the CLI in a fresh process, ephemeral Prefect, and read its run record."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    cmd = [sys.executable, "-m", "flows.score", "--models", str(manifest), "--input", str(data),
           "--output", str(output), "--force", "--quiet", *extra]
    t0 = time.time()
    steal = StealMeter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    stop, peak, descendants = threading.Event(), [0], dict[int, float]()
    sampler = threading.Thread(target=_rss_sampler, args=(proc.pid, stop, peak, descendants),
                               daemon=True)
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
        "sketch_seconds": record["summary"].get("sketch_seconds", 0.0),
        "feed": record["feed"],
        "steal": steal.share(),
        # The CLI's Prefect server is the product's own, though the CLI does not wait
        # for it to exit (so its CPU is not in this process's children's rusage).
        "foreign": steal.foreign(also_own=sum(descendants.values())),
        "server_cpu": sum(descendants.values()),
        "span": (timing["flow_started_at"], timing["committed_at"]),
    }


@contextlib.contextmanager
def local_dask_cluster(workers: int, log: Path) -> Iterator[str]:
    """A dask.distributed scheduler and ``workers`` single-threaded worker processes, all on
    127.0.0.1, stopped by pid afterwards: the "existing cluster" the dask runner targets."""
    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    dask = str(Path(sys.executable).with_name("dask"))
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("PREFECT_API_URL", None)  # tasks get the flow's server from its context
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "wb")  # noqa: SIM115 - closed in finally
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", f"127.0.0.1:{free_port()}"],
                              env=env, stdout=out, stderr=out)]
    try:
        for _ in range(workers):
            procs.append(subprocess.Popen(
                [dask, "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                 "--no-nanny", "--dashboard-address", f"127.0.0.1:{free_port()}"],
                env=env, stdout=out, stderr=out))
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(workers, timeout=120)
        yield address
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out.close()


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


def _first_partitions(data: Path, folder: Path, n: int) -> Path:
    """A folder of symlinks to the first ``n`` partitions: an input of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for part in sorted(data.glob("*.parquet"))[:n]:
        (folder / part.name).symlink_to(part.resolve())
    return folder


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


def _markdown(figures: dict[str, Any], lines: list[str]) -> str:
    return (
        "# Benchmarks\n\n"
        "Latest figures of `python -m benchmarks.run` (the product against the hardware "
        "ceiling, measured in one run; compare ratios, not seconds across runs).\n\n"
        f"- Command: `{figures['command'].strip()}`\n"
        f"- Date: {figures['date']}\n"
        f"- Machine: {figures['machine']}\n"
        f"- CPU path: {figures['cpu_path']['label']}\n"
        f"- Workload: {figures['workload']} ({figures['row_model_evals']:,} row-model "
        "evaluations: K members x P partitions x rows, MLP 32-256-256-1)\n\n"
        "```\n" + "\n".join(lines).strip("\n") + "\n```\n"
    )


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
    p.add_argument("--ceiling-seconds", type=float, default=6.0,
                   help="seconds per batch size, in 3 interleaved windows (default 6)")
    p.add_argument("--product-args", default="", help="extra CLI arguments for flows.score")
    p.add_argument("--json", type=Path, default=None, help="where to write the figures "
                   "(default: WORKDIR/results.json)")
    p.add_argument("--write-md", type=Path, default=None, metavar="FILE",
                   help="also write the figures as markdown (BENCHMARKS.md keeps the latest)")
    # The options that shape a run of the product: (flag, type, default, metavar, help).
    for flag, kind, default, metavar, text in (
        ("--dask", int, 0, "WORKERS", "also run the product with --runner dask on a local "
         "cluster of this many worker processes, and report its overhead vs threads"),
        ("--repeat", int, 2, "N", "full product runs, each compared with the ceiling "
         "measured just before and after it; the ratios shown are their mean (default 2)"),
        ("--quiet-wait", float, 300.0, "SECONDS", "before each ceiling and product run, wait "
         "up to this long until other processes use under 5%% of the CPU (0: do not wait; "
         "default 300)"),
        ("--startup-samples", int, 1, "N", "extra product runs on the first two partitions "
         "only, for the median start-up (it varies by seconds from run to run; default 1)"),
        ("--probe-interval", float, 0.5, "SECONDS", "how often the speed probe times its "
         "work, to show the machine's speed during each run against its ceiling windows "
         "(0: no probe; default 0.5)"),
    ):
        p.add_argument(flag, type=kind, default=default, metavar=metavar, help=text)
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # The product's runtime set-up (TensorFlow's allocator, Arrow's pool) for the ceiling
    # too, so both measure TensorFlow under the same settings.
    from tasks.runtime import set_up

    set_up()

    w = Workload(members=args.members, partitions=args.partitions, rows=args.rows_per_partition,
                 features=args.features, hidden=tuple(int(h) for h in args.hidden.split(",")))
    print(f"workload: {w.key} ({w.row_model_evals:,} row-model evaluations)", flush=True)
    t = time.perf_counter()
    manifest, data, prefixes = build_workload(w, args.workdir)
    print(f"  ready in {time.perf_counter() - t:.1f} s", flush=True)

    batch_sizes = [int(b) for b in args.ceiling_batches.split(",")]
    global _PROBE
    if args.probe_interval > 0:
        _PROBE = SpeedProbe(args.workdir / "speed-probe.txt", args.probe_interval)
        atexit.register(_PROBE.stop)

    def quiet() -> None:
        waited = wait_quiet(patience=args.quiet_wait) if args.quiet_wait > 0 else 0.0
        if waited > 1:
            print(f"  (waited {waited:.0f} s for other processes to leave the CPU)", flush=True)
    from loaders.cpu import cpu_path

    path = cpu_path()  # the same TF_ENABLE_ONEDNN_OPTS as the product's (inherited env)
    print(f"CPU path: {path.label}; MatMul + bias "
          f"{'fused by TensorFlow itself' if path.fuses_matmul_add else 'rewritten at load'}",
          flush=True)
    print("reference: numpy float32 matrix multiply on every core ...", flush=True)
    reference = matmul_reference(w)
    # The machine's speed drifts over minutes (the ceiling moved by up to 10 % between
    # one side of a 100-s product run and the other here), so each product run is
    # compared with the mean of the ceiling measured just before and just after it, and
    # with --repeat N the runs alternate with ceiling windows: C P C P C.
    quiet()
    print("ceiling (before): members' graphs alone, features in memory ...", flush=True)
    ceiling = measure_ceiling(w, prefixes, batch_sizes, args.ceiling_seconds)

    def at_best() -> dict[str, Any]:
        return measure_ceiling(w, prefixes, [ceiling["best_batch"]], args.ceiling_seconds,
                               threads=(ceiling["best_threads"],),
                               fused_job=ceiling["fused_best"])

    # The best of several noisy estimates overstates the best configuration's own rate
    # (the winner's curse): the windows that chose it are not the ones it is compared by.
    # It is measured anew, and that window is the first run's "before".
    ceiling["selection_rate"] = ceiling["rate"]
    if len(ceiling["rows_per_s"]) > 1:
        print("ceiling (before, the best configuration measured anew) ...", flush=True)
        quiet()
        first = at_best()
    else:
        first = ceiling
    ceilings = [first["rate"]]
    fused_ceilings = [first["fused_rate"]]
    steals = [first["steal"]]
    foreigns = [first["foreign"]]
    spans = [first["span"]]
    runs: list[dict[str, Any]] = []
    # The first run starts without a previous run record in its output, so it runs the
    # feed probe as a first run anywhere does; the next ones reuse its choice as scheduled
    # runs into one output do (loaders.feed.reused_feed). Each run's feed line says which.
    (args.workdir / "out" / w.key / "_run.json").unlink(missing_ok=True)
    for i in range(args.repeat):
        print(f"product run {i + 1}/{args.repeat}: python -m flows.score (fresh process, "
              "ephemeral Prefect) ...", flush=True)
        quiet()
        runs.append(run_product(manifest, data, args.workdir / "out" / w.key,
                                args.product_args.split()))
        # Right after the product run, before anything else runs: the ceiling windows
        # then bracket the run they are compared with.
        print("ceiling (after) ...", flush=True)
        quiet()
        after = at_best()
        ceilings.append(after["rate"])
        fused_ceilings.append(after["fused_rate"])
        steals.append(after["steal"])
        foreigns.append(after["foreign"])
        spans.append(after["span"])
    for i, run in enumerate(runs):
        run["machine_speed"] = (_PROBE.speed(run["span"], spans[i:i + 2])
                                if _PROBE is not None else None)
        run["ceiling"] = (ceilings[i] + ceilings[i + 1]) / 2
        run["ratio_flow"] = w.row_model_evals / run["flow"] / run["ceiling"]
        run["ratio_process"] = w.row_model_evals / run["wall"] / run["ceiling"]
        run["fused_ceiling"] = (fused_ceilings[i] + fused_ceilings[i + 1]) / 2
        run["ratio_flow_fused"] = w.row_model_evals / run["flow"] / run["fused_ceiling"]
    ceiling["windows"] = ceilings  # before run 1, after each run
    ceiling["fused_windows"] = fused_ceilings
    ceiling["window_steal"] = steals
    ceiling["window_foreign"] = foreigns
    ceiling["rate"] = float(np.mean([run["ceiling"] for run in runs]))
    ceiling["fused_rate"] = float(np.mean([run["fused_ceiling"] for run in runs]))
    startups = [run["startup"] for run in runs]
    if args.startup_samples:
        # Start-up alone, again: the same first batches as the full run (two partitions
        # in flight), without scoring the whole workload each time.
        two = _first_partitions(data, args.workdir / "startup-input" / w.key, 2)
    for i in range(args.startup_samples):
        print(f"start-up sample {i + 1}/{args.startup_samples} (first two partitions) ...",
              flush=True)
        startups.append(run_product(manifest, two, args.workdir / "out-startup" / w.key,
                                    args.product_args.split())["startup"])
    dask_run = None
    if args.dask:
        print(f"product on dask: --runner dask, local cluster of {args.dask} worker "
              "processes ...", flush=True)
        with local_dask_cluster(args.dask, args.workdir / "dask.log") as address:
            dask_run = run_product(manifest, data, args.workdir / "out-dask" / w.key,
                                   ["--runner", "dask", "--address", address,
                                    *args.product_args.split()])
    max_err = verify_sample(prefixes, data, args.workdir / "out" / w.key)
    product = {
        "wall": float(np.mean([run["wall"] for run in runs])),
        "flow": float(np.mean([run["flow"] for run in runs])),
        "peak_rss": max(run["peak_rss"] for run in runs),
        "model_loads": runs[-1]["model_loads"],
        "max_loads_per_checkpoint": max(
            (n for run in runs for proc in run["model_loads"].values() for n in proc.values()),
            default=0),
        "rows": runs[-1]["rows"],
        "runs": runs,
        "startup_samples": startups,
        "startup_median": float(np.median(startups)),
    }

    evals = w.row_model_evals
    c = ceiling["rate"]
    ratio_flow = float(np.mean([run["ratio_flow"] for run in runs]))
    ratio_process = float(np.mean([run["ratio_process"] for run in runs]))
    ratio_flow_fused = float(np.mean([run["ratio_flow_fused"] for run in runs]))
    rate_flow, rate_process = ratio_flow * c, ratio_process * c
    cf = ceiling["fused_rate"]
    rows = [
        (f"ceiling (Session.run only, best: {ceiling['best_threads']} threads, "
         f"batch {ceiling['best_batch']:,})",
         f"{c / 1e6:.2f} M/s", "1.00"),
        ("  the same on the product's graphs (as loaded)", f"{cf / 1e6:.2f} M/s",
         f"{cf / c:.2f}"),
        ("product, flow phase", f"{rate_flow / 1e6:.2f} M/s", f"{ratio_flow:.2f}"),
        ("product, whole process", f"{rate_process / 1e6:.2f} M/s", f"{ratio_process:.2f}"),
    ]
    lines: list[str] = []

    def show(text: str = "") -> None:
        """Print a result line and keep it for the markdown copy."""
        lines.append(text)
        print(text)

    show()
    flags = path.flags
    show(f"CPU path: {path.label}")
    show(f"  AVX-512 {'yes' if flags['avx512f'] else 'no'}, AVX512_BF16 "
         f"{'yes' if flags['avx512_bf16'] else 'no'}, AMX "
         f"{'yes' if flags['amx_tile'] else 'no'}; oneDNN rewrites "
         f"{'on' if path.onednn else 'off'}; MatMul + bias + Relu "
         + ("fused by TensorFlow itself (_MklNativeFusedMatMul)" if path.fuses_matmul_add
            else f"rewritten to BiasAdd at load ({ceiling['fused_bias_adds']} per member), "
            "which TensorFlow fuses")
         + f"; variables frozen to constants at load: {ceiling['frozen_variables']} per member")
    show()
    show(f"{'row-model evaluations per second':58s} {'rate':>10s} {'vs ceiling':>10s}")
    for name, rate, ratio in rows:
        show(f"{name:58s} {rate:>10s} {ratio:>10s}")
    show()
    runs_note = f" (mean of {len(runs)} runs)" if len(runs) > 1 else ""
    show(f"flow phase against the product's own graphs' ceiling (pipeline overhead only): "
         f"{ratio_flow_fused:.2f}")
    show(f"  ({ceiling['fused_bias_adds']} MatMul + bias adds per member rewritten to "
         f"BiasAdd at load, loaders/rewrite.py; {ceiling['frozen_variables']} variables "
         "frozen to constants, loaders/freeze.py; best there: "
         f"{ceiling['fused_best'][0]} threads, batch {ceiling['fused_best'][1]:,})")
    show()
    show(f"whole process wall time   {product['wall']:8.1f} s{runs_note}")
    show(f"flow time                 {product['flow']:8.1f} s{runs_note}")
    show(f"start-up (to first batch) {product['startup_median']:8.1f} s  (median of "
         f"{', '.join(f'{x:.1f}' for x in startups)})")
    show(f"peak RSS                  {product['peak_rss'] / 2**30:8.2f} GiB")
    for i, run in enumerate(runs):
        show(f"feed, run {i + 1}: {FeedChoice.model_validate(run['feed']).label}")
    sketches = sum(run["sketch_seconds"] for run in runs) / len(runs)
    show(f"drift sketches            {sketches:8.2f} s  ({sketches / product['flow']:.1%} of "
         "the flow time, counted as if nothing overlapped them)")
    loads = product["model_loads"]
    per_ckpt = [n for proc in loads.values() for n in proc.values()]
    show(f"model loads per checkpoint per process: max {product['max_loads_per_checkpoint']} "
         f"({len(loads)} process(es), {len(per_ckpt)} loads in all, in each run)")
    show(f"max abs error vs numpy    {max_err:.2e} (sampled rows)")
    if dask_run is not None:
        d_flow = evals / dask_run["flow"]
        show(f"dask runner ({args.dask} workers): flow {dask_run['flow']:.1f} s "
              f"({d_flow / 1e6:.2f} M/s, {d_flow / c:.2f} of ceiling), whole process "
              f"{dask_run['wall']:.1f} s; overhead vs threads: flow x"
              f"{dask_run['flow'] / product['flow']:.2f}, whole x"
              f"{dask_run['wall'] / product['wall']:.2f}")
    disturbed = [i + 1 for i, run in enumerate(runs) if run["foreign"] + run["steal"] > 0.05]
    if disturbed:
        show(f"  DISTURBED: other processes or guests took over 5 % of the CPU during run(s) "
             f"{disturbed}; their ratios understate the product")
    for i, run in enumerate(runs):
        show(f"  run {i + 1}: flow {run['flow']:.1f} s, ratio {run['ratio_flow']:.2f}; whole "
             f"{run['wall']:.1f} s, ratio {run['ratio_process']:.2f}; ceiling around it "
             f"{ceilings[i] / 1e6:.2f} / {ceilings[i + 1] / 1e6:.2f} M/s (product's graphs "
             f"{fused_ceilings[i] / 1e6:.2f} / {fused_ceilings[i + 1] / 1e6:.2f}), ratio to "
             f"those {run['ratio_flow_fused']:.2f}; CPU to the host / other processes "
             f"{run['steal']:.1%} / {run['foreign']:.1%} (ceiling windows "
             f"{steals[i]:.1%} / {foreigns[i]:.1%} and {steals[i + 1]:.1%} / "
             f"{foreigns[i + 1]:.1%})" + (
                 f"; machine speed during its flow against those windows (speed probe) "
                 f"{run['machine_speed']:.2f}" if run["machine_speed"] is not None else ""))
    for job, r in ceiling["rows_per_s"].items():
        fr = ceiling["fused_rows_per_s"].get(job)
        show(f"  ceiling, {job.split()[0]:>13s} threads, batch {int(job.split()[1]):>7,}: "
             f"{r / 1e6:.2f} M/s" + (f" (product's graphs {fr / 1e6:.2f})"
                                      if fr is not None and fr != r
                                      else "") + " (choosing the best)")
    show(f"  the best one chosen there at {ceiling['selection_rate'] / 1e6:.2f} M/s, measured "
         f"anew before run 1 at {ceilings[0] / 1e6:.2f}: the ratios use the windows measured "
         "anew, not the one it won in")
    show(f"  hardware yardstick: numpy float32 matmul {reference['gflops']:.0f} GFLOP/s, "
         f"i.e. {reference['mlp_rate'] / 1e6:.2f} M/s for this MLP; the ceiling is "
         f"{c / reference['mlp_rate']:.2f} of it")

    figures = {
        "workload": w.key, "row_model_evals": evals, "machine": _machine(),
        "cpu_path": path.model_dump() | {"label": path.label},
        "ceiling": ceiling, "product": product, "dask": dask_run, "reference": reference,
        "ratio_flow": ratio_flow, "ratio_process": ratio_process,
        "ratio_flow_fused": ratio_flow_fused,
        "max_abs_error": max_err,
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None
                                                            else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.write_md:
        args.write_md.write_text(_markdown(figures, lines), encoding="utf-8")
        print(f"markdown written to {args.write_md}")
    out = args.json or args.workdir / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2, default=str))
    print(f"\nfigures written to {out}")
    if _PROBE is not None:
        _PROBE.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
