"""How a run stops: its work on a thread that signals never reach, checkpoints where it
looks for a stop, waits in short slices, and the API asked within a bound.

A stop (Ctrl-C, SIGTERM, a cancel that a worker or ``serve`` delivers as SIGTERM) must
leave a run record that agrees with the disk, remove the lock and end the process within
seconds, whatever Prefect's futures, its API and the threads in flight are doing.
"""

from __future__ import annotations

import contextlib
import contextvars
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from prefect.futures import PrefectFuture

__all__ = ["Finished", "RunStopped", "StopRequest", "run_guarded", "within"]

T = TypeVar("T")

# How long the main thread sleeps at most before it looks at noted signals again.
SLICE_SECONDS = 0.25


class RunStopped(BaseException):
    """Raised in the run's own thread at a checkpoint once a stop was asked for."""


class StopRequest:
    """The stop signal that landed in the main thread, for the run's thread to see."""

    def __init__(self) -> None:
        self.signal: BaseException | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def check(self) -> None:
        if self.signal is not None:
            raise RunStopped(type(self.signal).__name__)


def run_guarded(body: Callable[[StopRequest], T], bound: float) -> T:
    """Run ``body`` on a thread of its own, in this context, while this (main) thread only
    waits for it; a stop signal raised here is handed to ``body`` (which checks it at
    its checkpoints and stops), and raised again once ``body`` has ended, or after
    ``bound`` seconds if it does not.

    Python raises a signal's exception in the main thread wherever it is. Landing
    between a lock's acquire and the ``try`` that releases it (in a logging handler,
    say), it left that lock taken: every worker thread that logged then blocked for
    ever, and Prefect's executor shutdown with them (the CLI hung so with Ctrl-C and
    SIGTERM in quick succession). Here it can land only in this wait, which holds no
    lock. Prefect's SIGTERM handler stays in place, so its engine still tells a cancel
    (Cancelled) from a kill (Crashed), and further signals during the stop are
    swallowed rather than cutting the partitions' grace short (a Ctrl-C on ``serve``
    arrives as SIGINT and then as the runner's SIGTERM). A stop that comes after
    ``body`` returned lets the completed run stand.
    """
    stop = StopRequest()
    outcome: list[tuple[bool, Any]] = []
    wake: queue.SimpleQueue[None] = queue.SimpleQueue()

    def run() -> None:
        try:
            outcome.append((True, body(stop)))
        except BaseException as exc:
            outcome.append((False, exc))
        wake.put(None)

    threading.Thread(target=contextvars.copy_context().run, args=(run,),
                     name="ensemble-run", daemon=True).start()
    try:
        _wait_for(outcome, wake, stop, bound)
    except BaseException as exc:  # raised outside the wait's guards, or its bound passed
        stop.signal = stop.signal or exc
        raise
    ok, value = outcome[0]
    if ok:
        return value  # type: ignore[no-any-return]
    raise value if stop.signal is None else stop.signal


class _Bound(BaseException):
    """The run did not end within its bound after a stop."""


def _wait_for(outcome: list[tuple[bool, Any]], wake: queue.SimpleQueue[None],
              stop: StopRequest, bound: float) -> None:
    """Until the body has an outcome. Python raises a pending signal at the next of
    certain instructions (a loop's jump back, a call), wherever that is: the inner loop,
    its jump back included, is inside a ``try``, and the handler that notes the stop is
    inside a second one, for a second signal pending at the same moment (Ctrl-C and
    SIGTERM at once). The outcome is read from ``outcome``, not from the queue, which
    only wakes this thread: a signal raised as ``get`` returns loses nothing."""
    deadline = [float("inf")]
    over: list[bool] = []

    def note(exc: BaseException) -> None:
        if isinstance(exc, _Bound):
            over.append(True)
        elif stop.signal is None:
            stop.signal, deadline[0] = exc, time.monotonic() + bound

    while not over:
        try:
            try:
                while not outcome:
                    if time.monotonic() >= deadline[0]:
                        raise _Bound
                    with contextlib.suppress(queue.Empty):
                        wake.get(timeout=SLICE_SECONDS)
                return
            except BaseException as exc:
                note(exc)
        except BaseException as exc:
            note(exc)
    assert stop.signal is not None
    raise stop.signal


class Finished:
    """Futures as they finish, in order, fed by each future's done callback.

    Waits are short slices, never one untimed wait, so a stop request is seen within a
    slice and a stop's grace ends at its deadline whatever the futures do.
    """

    def __init__(self, stop: StopRequest) -> None:
        self.stop = stop
        self.queue: queue.SimpleQueue[PrefectFuture[Any]] = queue.SimpleQueue()
        self.done: set[PrefectFuture[Any]] = set()

    def watch(self, fut: PrefectFuture[Any]) -> None:
        fut.add_done_callback(self._finished)

    def _finished(self, fut: PrefectFuture[Any]) -> None:
        self.done.add(fut)
        self.queue.put(fut)

    def next(self) -> PrefectFuture[Any]:
        """The next finished future; raises a noted stop while it waits."""
        while True:
            self.stop.check()
            with contextlib.suppress(queue.Empty):
                return self.queue.get(timeout=SLICE_SECONDS)

    def until(self, deadline: float) -> None:
        """Wait until a future finishes or ``deadline`` (monotonic) passes."""
        if (left := min(SLICE_SECONDS, deadline - time.monotonic())) > 0:
            with contextlib.suppress(queue.Empty):
                self.queue.get(timeout=left)


def within(seconds: float, call: Callable[[], T]) -> T | None:
    """``call()`` on a daemon thread in this context (the flow run's, for artifacts),
    given up after ``seconds``; None if it raised or did not end in time. A stopping
    run's API calls must never hold its run record and lock hostage to a server that
    is slow or gone."""
    answer: list[T] = []

    def run() -> None:
        with contextlib.suppress(Exception):
            answer.append(call())

    worker = threading.Thread(target=contextvars.copy_context().run, args=(run,),
                              name="ensemble-stop-api", daemon=True)
    worker.start()
    worker.join(seconds)  # called from the run's thread, where no signal lands
    return answer[0] if answer else None
