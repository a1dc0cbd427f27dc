"""``python -m flows.score serve``: the deployments of ``deployments/prefect.yaml``, served
from this process.

For one host without a work pool or worker: :func:`prefect.serve` registers the
deployments (schedule included) and runs their flow runs as subprocesses of this one.
The definitions are read from ``deployments/prefect.yaml`` so the two ways of deploying
cannot drift apart: same descriptions, tags, parameters and schedules.

Served deployments are named ``<name>-local`` (``adhoc-local``, ``nightly-local``): the
same server may also hold the ``prefect deploy`` ones, which serving must never
overwrite, and which Prefect pauses when the process serving them stops. A schedule is
served only where the deployed twin does not already run it, so a night is scored once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

__all__ = ["LOCAL_SUFFIX", "PREFECT_FILE", "REPO_ROOT", "build_deployments",
           "load_definitions", "main"]

LOCAL_SUFFIX = "-local"
FLOW_NAME = "ensemble-score"

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO_ROOT / "deployments" / "prefect.yaml"


def load_definitions(path: Path = PREFECT_FILE) -> list[dict[str, Any]]:
    """The ``deployments:`` entries of a prefect.yaml, YAML anchors resolved."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    deployments = data.get("deployments") or []
    if not isinstance(deployments, list) or not deployments:
        raise ValueError(f"{path} defines no deployments")
    return deployments


def _schedules(definition: dict[str, Any], *, paused: bool = False) -> list[Any]:
    from prefect.schedules import Cron

    schedules = []
    for entry in definition.get("schedules") or []:
        if "cron" not in entry:
            raise ValueError(f"deployment {definition.get('name')!r}: only cron schedules are "
                             f"served, got {entry}")
        schedules.append(Cron(entry["cron"], timezone=entry.get("timezone"),
                              active=entry.get("active", True) and not paused))
    return schedules


def build_deployments(path: Path = PREFECT_FILE, *, scheduled_elsewhere: frozenset[str]
                      = frozenset()) -> list[Any]:
    """One :class:`RunnerDeployment` of ``score_ensemble`` per entry of ``path``, named
    ``<name>-local``; the schedules of the entries in ``scheduled_elsewhere`` (deployed
    with an active schedule on the same server) are served paused.

    Raises:
        ValueError: an entry points at another flow or uses a schedule other than cron.
    """
    from flows.ensemble import score_ensemble

    out = []
    for d in load_definitions(path):
        if d.get("entrypoint") != "flows.ensemble:score_ensemble":
            raise ValueError(f"deployment {d.get('name')!r} has entrypoint "
                             f"{d.get('entrypoint')!r}; only the scoring flow is served")
        schedules = _schedules(d, paused=d["name"] in scheduled_elsewhere)
        out.append(score_ensemble.to_deployment(
            name=f"{d['name']}{LOCAL_SUFFIX}",
            description=d.get("description"),
            tags=[*(d.get("tags") or []), "served"],
            parameters=d.get("parameters") or {},
            schedules=schedules,
            concurrency_limit=d.get("concurrency_limit"),
        ))
    return out


# A served deployment polled this recently, and not paused, has a live ``serve``.
LIVE_POLL_SECONDS = 60.0


def _deployed(names: list[str]) -> tuple[frozenset[str], list[str]]:
    """Which of the file's deployments run an active schedule on the server through a
    work pool, and which ``<name>-local`` names are held: by a work-pool deployment
    (serving would overwrite it) or by another ``serve`` still running (stopping either
    would pause the other's deployments)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    scheduled, taken = set(), []
    with get_client(sync_client=True) as client:
        for name in names:
            for full, local in ((name, False), (f"{name}{LOCAL_SUFFIX}", True)):
                try:
                    found = client.read_deployment_by_name(f"{FLOW_NAME}/{full}")
                except ObjectNotFound:
                    continue
                if found.work_pool_name is None:
                    if local and _served_now(found):
                        taken.append(f"{full} (served by another process right now)")
                    continue  # a served deployment that nobody serves: ours to replace
                if local:
                    taken.append(full)
                elif not found.paused and any(s.active for s in found.schedules):
                    scheduled.add(name)
    return frozenset(scheduled), taken


def _served_now(deployment: Any) -> bool:
    polled = deployment.last_polled
    return (not deployment.paused and polled is not None
            and time.time() - polled.timestamp() < LIVE_POLL_SECONDS)


def _describe(deployment: Any) -> str:
    crons = [f"{s.schedule.cron} ({s.schedule.timezone})" for s in deployment.schedules]
    return (f"ensemble-score/{deployment.name}: "
            f"{'schedule ' + ', '.join(crons) if crons else 'no schedule'}; "
            f"parameters {deployment.parameters or '{}'}")


def main(argv: list[str]) -> int:
    """Serve the deployments until interrupted; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.score serve",
        description="Serve the deployments of deployments/prefect.yaml (schedules included) "
        "from this process, without a work pool. Needs a Prefect server: run `prefect server "
        "start` and set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api).",
    )
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="flow runs at once (default: no limit)")
    parser.add_argument("--list", action="store_true",
                        help="print the deployments that would be served, and exit")
    args = parser.parse_args(argv)
    # Relative paths in the parameters and the entrypoint are the repo root's, as they are
    # for the worker, whose pull step starts there.
    os.chdir(REPO_ROOT)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        if args.list:
            for d in build_deployments():
                print(_describe(d))
            return 0
        names = [d["name"] for d in load_definitions()]
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from prefect import serve

    if why := _no_server():
        print(f"error: {why}", file=sys.stderr)
        return 2
    scheduled, taken = _deployed(names)
    if taken:
        print(f"error: the server already has deployment(s) "
              f"{', '.join(f'{FLOW_NAME}/{t}' for t in taken)}, the names serve uses; "
              "stop that serve, or rename or delete work-pool deployments first (serve "
              "never overwrites a deployment it did not create, and one serve per server "
              "serves these names)", file=sys.stderr)
        return 2
    deployments = build_deployments(scheduled_elsewhere=scheduled)
    for name in sorted(scheduled):
        print(f"{FLOW_NAME}/{name} is deployed with an active schedule on this server: "
              f"{FLOW_NAME}/{name}{LOCAL_SUFFIX} is served with its schedule paused, so "
              "each run happens once", flush=True)
    for d in deployments:
        print(f"serving {_describe(d)}", flush=True)
    signal.signal(signal.SIGINT, _stop_gracefully)
    try:
        serve(*deployments, limit=args.limit)
    except KeyboardInterrupt:
        return 130
    return 0


def _no_server() -> str | None:
    """Why there is no server to serve on, or None."""
    from prefect.settings import get_current_settings

    from flows.server import unreachable

    url = get_current_settings().api.url
    if not url:
        return ("serving needs a Prefect server that outlives this command: start "
                "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    return unreachable(str(url))


def _stop_gracefully(signum: int, frame: Any) -> None:
    """Ctrl-C: stop the way Prefect's runner stops on SIGTERM, cancelling the runs in
    flight and waiting for them (each writes its run record), instead of tearing down
    at once, which killed a run's process while it was still recording. A second Ctrl-C
    exits at once."""
    print("stopping: runs in flight are cancelled and record what they committed "
          "(Ctrl-C again to exit at once)", file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.kill(os.getpid(), signal.SIGTERM)
