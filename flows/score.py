"""Command line: ``python -m flows.score`` (the demo), ``python -m flows.score --models M
--input P --output D`` (your models), ``python -m flows.score serve`` (deployments).

Heavy imports (TensorFlow, Prefect) happen after the arguments are parsed, so ``--help``
is instant and ``--debug`` can turn TensorFlow's own logging back on before it loads.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "cli", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_TERMINATED = 128 + 15  # as a shell reports a command ended by SIGTERM

EPILOG = """\
examples:
  python -m flows.score                      run the embedded demo (builds it once in .demo/)
  python -m flows.score --models models.yaml --input data/ --output out/
  python -m flows.score --models m.yaml --input 'data/**/*.parquet' --output out/ --ensemble median
  python -m flows.score serve                serve the deployments on this host
  python -m flows.score bless --models m.yaml --sample data/
                                             bless golden rows every run checks first

output: <output>/ensemble/ mirrors the input's relative paths, one Parquet file per input
partition, with the id column, score_<member>, ensemble_score, ensemble_std and n_members.
exit codes: 0 success, 1 some partitions failed (the rest are committed) or drift beyond
max_psi with 'drift: fail', 2 bad arguments, manifest, models or data, or the golden check
failed (nothing was scored), 130 Ctrl-C, 143 SIGTERM (committed partitions are kept and
the run record says what is pending).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.score",
        description="Score Parquet data with an ensemble of TensorFlow models, each in its "
        "own graph and session, orchestrated by Prefect. With no arguments, runs the demo.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", metavar="MANIFEST", help="models manifest (YAML): id_column, "
                   "features, models (name, path, input/output or signature, weight); a "
                   "path is a TF1 checkpoint, a SavedModel folder, or a Keras .keras or "
                   ".h5 file")
    p.add_argument("--input", metavar="PATH", help="a Parquet file, a folder of them "
                   "(recursive, hive key=value folders allowed) or a glob; local or "
                   "s3://bucket/prefix")
    p.add_argument("--output", metavar="DIR", help="output folder; the table goes to "
                   "DIR/ensemble/ (member scores included), bad rows to DIR/quarantine/, the "
                   "run record to DIR/_run.json; s3://bucket/prefix works too")
    p.add_argument("--ensemble", choices=["mean", "weighted", "median"], default="mean",
                   help="how member scores combine (default: mean; weighted uses the "
                   "manifest's weights)")
    p.add_argument("--bad-rows", choices=["fail", "quarantine"], default=None,
                   help="rows with null/NaN/inf features: fail the partition, or set them "
                   "aside in DIR/quarantine/ (default: the manifest's, else fail)")
    p.add_argument("--concurrency", type=int, default=2, metavar="N",
                   help="partitions in flight at once (default: 2)")
    p.add_argument("--batch-size", type=int, default=None, metavar="ROWS",
                   help="rows per batch read, scored and written at once; under 65536, each "
                   "batch is one TensorFlow call (default: the rows per call, 16384, or "
                   "65536 where a probe of about a second before scoring does not find "
                   "16384 at least 10%% faster on this machine; the probe runs on inputs "
                   "of several million rows and within memory bounds; the log and the run "
                   "record's feed say what was chosen and why; later runs into the same "
                   "output reuse a probe's choice for up to 7 days while the CPU, "
                   "TensorFlow, members, number of features and partitions in flight stay "
                   "the same, except with --runner dask)")
    p.add_argument("--min-members", type=int, default=None, metavar="K",
                   help="fewest members with a finite score a row needs, and that must "
                   "load for the run to go on (default: the manifest's min_members, else "
                   "all); a member missing for a row gets a null score_<name>")
    p.add_argument("--baseline", metavar="RUN_JSON", default=None,
                   help="a run record (_run.json) to report drift against (default: the "
                   "previous run into the same output)")
    p.add_argument("--retries", type=int, default=3, metavar="N",
                   help="retries for transient I/O errors (default: 3)")
    _add_runner_arguments(p)
    p.add_argument("--force", action="store_true",
                   help="re-score everything, ignoring committed member outputs")
    p.add_argument("--verify-inputs", action="store_true",
                   help="decide what is unchanged since the last run by hashing every local "
                   "input file whole, not by size, mtime and Parquet footer (reads the "
                   "input once more)")
    _add_model_cache_arguments(p)
    p.add_argument("--demo-dir", metavar="DIR", default=".demo",
                   help="where the demo is built when no --models is given (default: .demo)")
    p.add_argument("--quiet", action="store_true", help="only warnings and the final summary")
    p.add_argument("--debug", action="store_true",
                   help="show tracebacks and TensorFlow's own logs")
    return p


def _add_runner_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runner", choices=["threads", "processes", "dask"], default="threads",
                   help="Prefect task runner: threads (default; one process), processes "
                   "(ProcessPoolTaskRunner, spawned workers) or dask (an existing "
                   "dask.distributed cluster, see --address)")
    p.add_argument("--address", metavar="tcp://HOST:PORT", default=None,
                   help="with --runner dask: the cluster's scheduler address")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="with --runner processes: worker processes (default: cores)")


def _add_model_cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-cache", metavar="DIR", default=None,
                   help="where s3:// models are downloaded, once per host (default: "
                   "$ENSEMBLE_MODEL_CACHE, else ~/.cache/ensemble-scoring/models)")
    p.add_argument("--model-cache-size", metavar="BYTES", default=None, type=_size,
                   help="size limit of the model cache, e.g. 20G; least recently used "
                   "models not in use are deleted beyond it (default: "
                   "$ENSEMBLE_MODEL_CACHE_MAX_BYTES, else 10G)")


def _size(text: str) -> int:
    from loaders.remote import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _format_rows(path: Path, limit: int = 5) -> str:
    """The first rows of one ensemble file as a small fixed-width table (no pandas)."""
    import pyarrow.parquet as pq

    reader = pq.ParquetFile(path)
    table = reader.read_row_group(0).slice(0, limit) if reader.num_row_groups else None
    if table is None or table.num_rows == 0:
        return "  (no rows)"
    cols = table.column_names
    cells = [[f"{v:.6f}" if isinstance(v, float) else "null" if v is None else str(v)
              for v in table.column(c).to_pylist()] for c in cols]
    widths = [max(len(c), *(len(v) for v in col)) for c, col in zip(cols, cells, strict=True)]
    lines = ["  " + "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    for i in range(table.num_rows):
        lines.append("  " + "  ".join(col[i].rjust(w) for col, w in zip(cells, widths,
                                                                        strict=True)))
    return "\n".join(lines)


def print_summary(summary: Any, wall: float) -> None:
    """Print the run report's summary (the same as the UI's summary artifact) and the
    table's first rows."""
    print()
    if summary.report is not None:
        from flows.report import render_summary_text

        print(render_summary_text(summary.report))
    else:  # the report could not be built (the flow logged why): the basic figures
        print(f"Ensemble table: {summary.ensemble_dir}")
        print(f"Rows:           {summary.rows:,} in {summary.partitions} partition(s)")
        print(f"Members:        {len(summary.members)} "
              f"({', '.join(m.name for m in summary.members)})")
    print(f"Wall time:      {wall:.1f} s, with checks and start-up")
    files = [] if summary.ensemble_dir.startswith("s3://") else sorted(
        p for p in Path(summary.ensemble_dir).rglob("*.parquet") if not p.name.startswith("."))
    if files:
        print(f"First rows of {files[0].relative_to(summary.ensemble_dir)}:")
        print(_format_rows(files[0]))


def _configure(args: argparse.Namespace) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if args.debug else "3")
    # A fresh ephemeral server migrates its database first; on a slow disk that can take
    # longer than Prefect's default wait. Telemetry is of no use here and its writes
    # contend with ours for the SQLite lock.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if args.quiet:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _start_prefect_early() -> Any:
    """Start the run's own Prefect server now, in parallel with TensorFlow's import (see
    ``flows.server``), unless the user points at a server (PREFECT_API_URL) or turned
    ephemeral mode off."""
    if os.environ.get("PREFECT_API_URL") or os.environ.get(
            "PREFECT_SERVER_EPHEMERAL_ENABLED", "true").lower() in ("0", "false"):
        return None
    from flows.server import LocalServer

    server = LocalServer()
    server.start()
    return server


def run(args: argparse.Namespace) -> int:
    """Validate everything, then run the flow; returns the exit code.

    The run's own server, if any, is stopped at exit, after Prefect has sent the logs
    and events still queued (see ``flows.server``).
    """
    started = time.perf_counter()
    server = _start_prefect_early()
    with contextlib.ExitStack() as stack:
        return _run(args, server, started, stack)


def _run(args: argparse.Namespace, server: Any, started: float,
         stack: contextlib.ExitStack) -> int:
    from pydantic import ValidationError

    from loaders.errors import ScoringError
    from tasks.runtime import set_up

    set_up(debug=args.debug)  # TensorFlow imports here, while the server starts
    if server is None and (why := _configured_server_unreachable()):
        return _fail(f"{why}\nNothing was scored.", EXIT_USAGE)
    try:
        params = _checked_params(args, stack)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return _fail(f"invalid arguments: {problems}", EXIT_USAGE)
    except ScoringError as err:
        if args.debug:
            raise
        return _fail(f"{err}\nNothing was scored.", EXIT_USAGE)
    if params is None:
        return _fail("--models needs --input and --output (see --help)", EXIT_USAGE)
    state = _run_flow(params, server)
    if isinstance(state, str):
        return _fail(state, EXIT_FAILED)
    if not state.is_completed():
        exc = state.result(raise_on_failure=False)
        if args.debug and isinstance(exc, BaseException):
            raise exc
        return _fail(str(exc) if isinstance(exc, ScoringError) else f"run failed: {exc!r}",
                     EXIT_USAGE if isinstance(exc, _refusals()) else EXIT_FAILED)
    summary = state.result()
    try:
        print_summary(summary, time.perf_counter() - started)
    except (KeyboardInterrupt, _Terminated):  # the run is complete: only the print stops
        from flows.records import RUN_RECORD

        print(f"\n(summary cut short by a signal; the run completed, and its record is "
              f"{summary.output_dir}/{RUN_RECORD})", file=sys.stderr, flush=True)
    return EXIT_OK


def _configured_server_unreachable() -> str | None:
    """Why the server PREFECT_API_URL names does not answer (None if it does, or if none
    is configured): said before the output folder is touched."""
    from prefect.settings import PREFECT_API_URL

    from flows.server import unreachable

    url = PREFECT_API_URL.value()
    return unreachable(url) if url else None


def _refusals() -> tuple[type[BaseException], ...]:
    from loaders.errors import DataError, GoldenMismatch, ManifestError, ModelLoadError

    return (GoldenMismatch, ManifestError, ModelLoadError, DataError)


def _checked_params(args: argparse.Namespace, stack: contextlib.ExitStack) -> Any:
    """The flow's parameters from the command line, after every check that needs no
    Prefect (manifest, files, models, data, output), with the output folder locked;
    None when --models comes without --input and --output.

    Raises:
        ValidationError: an argument out of range.
        ScoringError: what is wrong with the manifest, models, data or output.
    """
    from flows.params import ScoreParams
    from tasks.fs import is_s3
    from tasks.storage import check_output_apart, output_lock

    if args.models is None:
        from flows.demo import build_demo

        demo = Path(args.demo_dir)
        print(f"Demo: building (once) 3 checkpoints with identical variable names and 4 "
              f"Parquet partitions in {demo.resolve()}", flush=True)
        args.models = str(build_demo(demo))
        args.input = args.input or str(demo / "data")
        args.output = args.output or str(demo / "output")
    elif args.input is None or args.output is None:
        return None
    check_output_apart(args.input, args.output)
    params = ScoreParams(
        models=args.models, manifest=None, input=args.input, output=args.output,
        ensemble=args.ensemble, bad_rows=args.bad_rows, concurrency=args.concurrency,
        batch_size=args.batch_size, retries=args.retries, force=args.force,
        min_members=args.min_members, baseline=args.baseline,
        verify_inputs=args.verify_inputs, runner=args.runner, address=args.address,
        workers=args.workers, model_cache=args.model_cache,
        model_cache_size=args.model_cache_size,
    )
    # Taken before models load so a second run on the folder fails in a second; the
    # flow takes it again (re-entrant) and holds it to the end.
    out = args.output if is_s3(args.output) else Path(args.output).expanduser().resolve()
    stack.enter_context(output_lock(out))
    preflight(params)
    return params


def _run_flow(params: Any, server: Any) -> Any:
    """The flow's final state, on the run's own server if it has one; a message when that
    server could not start."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )

    from flows.ensemble import score_ensemble

    _import_run_machinery()
    if server is not None and PREFECT_API_URL.value():
        server.stop()  # a server is configured in the profile: use it, not ours
        server = None
    # Heartbeats let a server mark a run whose process died as crashed; the run's own
    # server dies with the process, so they are of no use there, and ending the run waits
    # up to 1 s for the heartbeat thread's sleep.
    private = ({PREFECT_API_URL: server.api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
               if server is not None else {})
    with temporary_settings(updates=private):
        if server is not None:
            try:
                server.wait()
            except RuntimeError as err:
                return f"{err}\nSet PREFECT_API_URL to use a running server."
        return score_ensemble(params, return_state=True)


def _import_run_machinery() -> None:
    """Import what Prefect imports lazily when the first flow and task start (its engines,
    artifacts, concurrency; ~140 modules, 0.3-0.5 s here).

    Done while the private server is still starting, this costs nothing; done by the
    first flow call, it delays the first batch.
    """
    import importlib

    # fastapi.encoders: Prefect serializes flow parameters with it.
    for module in ("prefect.flow_engine", "prefect.task_engine", "prefect.artifacts",
                   "fastapi.encoders"):
        importlib.import_module(module)


def preflight(params: Any) -> None:
    """Check the manifest, data and models before Prefect starts, so mistakes show in
    seconds. Models are loaded into this process's cache, which the flow then reuses; a
    member that cannot be loaded is reported here, and stops the run only when fewer
    than min_members remain (the flow then goes on without it). The golden check runs
    here too."""
    from loaders.cache import MODEL_CACHE
    from loaders.errors import ModelLoadError, ScoringError
    from tasks.plan import make_plan

    manifest = params.load_manifest()
    quorum = manifest.quorum(params.min_members)
    make_plan(manifest, params.input, params.output, verify_inputs=params.verify_inputs)
    if params.baseline is not None:
        from flows.guards import read_baseline
        from loaders.errors import DataError

        try:
            read_baseline(params.baseline, required=True)
        except ValueError as bad:
            raise DataError(f"{bad}; give --baseline a _run.json a run wrote") from bad
    failed: dict[str, ScoringError] = {}
    for spec in manifest.models:
        try:
            MODEL_CACHE.get(spec, len(manifest.features))
        except ScoringError as exc:
            failed[spec.name] = exc
    if len(manifest.models) - len(failed) >= quorum and manifest.golden is not None:
        # The flow checks again (UI and deployment runs have no preflight); here a refusal
        # is a message and exit code 2, before a flow run starts.
        from tasks.golden import check_golden

        check_golden(manifest, {s.name: MODEL_CACHE.get(s, len(manifest.features))
                                for s in manifest.models if s.name not in failed},
                     list(failed))
    if not failed:
        return
    if len(manifest.models) - len(failed) < quorum:
        if len(failed) == 1:
            raise next(iter(failed.values()))
        listing = "\n".join(f"  - {name}: {err}" for name, err in failed.items())
        raise ModelLoadError(f"{len(failed)} member(s) cannot be loaded and fewer than "
                             f"min_members={quorum} remain:\n{listing}")
    for name, err in failed.items():
        print(f"warning: member {name} cannot be loaded and will be missing from this run "
              f"(min_members={quorum} still met): {err}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from tasks.runtime import arrow_system_pool, limit_malloc_arenas

    limit_malloc_arenas()  # before the first thread (the server's start) is created
    arrow_system_pool()  # before anything imports pyarrow
    if argv[:1] == ["serve"]:
        from flows.serve import main as serve_main

        return serve_main(argv[1:])
    if argv[:1] == ["bless"]:
        from flows.bless import main as bless_main

        return bless_main(argv[1:])
    args = build_parser().parse_args(argv)
    _configure(args)
    previous = _stop_on_sigterm()
    since = time.time()
    try:
        return run(args)
    except (KeyboardInterrupt, _Terminated) as stop:
        _remove_own_lock(args)
        if (record := _completed_record(args, since)) is not None:
            print(f"\n(stopped after the run completed; its record is {record})",
                  file=sys.stderr, flush=True)
            return EXIT_OK
        if isinstance(stop, KeyboardInterrupt):
            return _fail("interrupted; committed partitions are kept, re-run to finish", 130)
        return _fail("terminated (SIGTERM); committed partitions are kept, re-run to finish",
                     EXIT_TERMINATED)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _remove_own_lock(args: argparse.Namespace) -> None:
    """The output's lock file, if a stop left it behind as the lock was released
    (``LocalStore.remove_own_lock``): the next run would report this one as killed."""
    if not args.output:
        return
    with contextlib.suppress(Exception):
        from tasks.storage import LocalStore, store_for

        store = store_for(args.output)
        if isinstance(store, LocalStore):
            store.remove_own_lock()


def _completed_record(args: argparse.Namespace, since: float) -> str | None:
    """The run record's location if the run this command started completed: a stop that
    lands as Prefect closes the flow run, or before the summary, stops nothing."""
    if not args.output:
        return None
    with contextlib.suppress(Exception):
        from flows.records import RUN_RECORD
        from tasks.storage import read_json, store_for

        location = store_for(args.output).uri(RUN_RECORD)
        record = read_json(location)
        if (record.get("status") == "completed"
                and record.get("timing", {}).get("flow_started_at", 0) >= since):
            return location
    return None


class _Terminated(BaseException):
    """SIGTERM, raised where the command is, so that it unwinds like Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


def _stop_on_sigterm() -> Any:
    """Make SIGTERM unwind the command like Ctrl-C (its lock removed, a message, exit 143)
    instead of killing it where it stands; returns the handler it replaced.

    During the flow Prefect's own handler is in place, the flow records what it
    committed, and Prefect then hands the signal back to the handler it replaced: this
    one. Only in the main thread (where Python delivers signals), else None.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


class _ExitWithoutTeardown:
    """The command's last exit step: end the process once everything else has run.

    Registered before anything else registers an exit handler, it runs after all of them
    (Prefect's log and event workers have sent what was queued, the run's own server was
    told to stop, temporary folders are removed). What is left is the interpreter's
    teardown of TensorFlow's and Prefect's modules, which took 1.1-1.5 s of every run here
    and does nothing a finished run needs: the tables and the run record are committed
    and closed by then. The exit code is the command's; 1 if it ended in an uncaught
    exception (whose traceback Python has printed by then).
    """

    def __init__(self) -> None:
        self.code = EXIT_FAILED

    def __call__(self) -> None:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(self.code)


def _end_at_once_on_signals(code: int) -> None:
    """Once the command's outcome is decided, a Ctrl-C or SIGTERM ends the process at
    once with that outcome, skipping the exit handlers still to run (Prefect's drain of
    queued logs, the server's stop: it dies with this process anyway), instead of a
    traceback from them or a SIGTERM's default death (-15) after a completed run."""
    def end(signum: int, frame: Any) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, end)


def cli() -> None:
    """``python -m flows.score`` and the ``ensemble-score`` script."""
    finish = _ExitWithoutTeardown()
    atexit.register(finish)
    try:
        finish.code = main()
        _end_at_once_on_signals(finish.code)
    except SystemExit as exc:  # --help, argparse's usage errors
        finish.code = (exc.code if isinstance(exc.code, int)
                       else EXIT_OK if exc.code is None else EXIT_FAILED)
        raise
    except KeyboardInterrupt:
        finish.code = 130
        raise
    sys.exit(finish.code)


if __name__ == "__main__":
    cli()
