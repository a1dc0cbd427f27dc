"""The Prefect tasks: thin wrappers over the plain functions, which tests call directly.

Retries are declared here and only for what a second try can fix (I/O errors, timeouts,
lost connections); a bad schema or a broken checkpoint fails at once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import pyarrow as pa
from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from loaders.base import GraphScorer
from loaders.cache import MODEL_CACHE
from loaders.errors import ModelFetchError, ScoringError
from loaders.feed import FeedChoice, probe_members
from loaders.inspect import resolve_model
from loaders.manifest import Manifest, ModelSpec
from tasks.golden import GoldenCheck, check_golden
from tasks.ids import find_repeated_ids
from tasks.plan import MemberInfo
from tasks.runtime import set_up
from tasks.scoring import PartitionResult, score_partition

__all__ = ["check_ids", "choose_feed", "golden_check", "is_transient", "load_member",
           "score_partition_task"]

P = ParamSpec("P")
R = TypeVar("R")


def is_transient(exc: BaseException) -> bool:
    """Worth another try: I/O and network trouble (a model download cut short included),
    but not our other explained errors nor Arrow's complaints about file contents (which
    reading again will not change)."""
    if isinstance(exc, ScoringError):  # explained: deterministic, but a failed download
        return isinstance(exc, ModelFetchError)
    if isinstance(exc, pa.ArrowInvalid):
        return False
    return isinstance(exc, (OSError, TimeoutError, ConnectionError))


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by result()
        return is_transient(exc)
    return False


def _retrying(fn: Callable[P, R], name: str, run_name: str) -> Task[P, R]:
    return task(
        name=name,
        task_run_name=run_name,
        retries=3,
        retry_delay_seconds=exponential_backoff(backoff_factor=1),
        retry_jitter_factor=0.5,
        retry_condition_fn=_retry_transient,
        cache_policy=NO_CACHE,
    )(fn)


def _load_member(spec: ModelSpec, n_features: int) -> MemberInfo:
    """Load one member into this process's cache (its own graph and session)."""
    set_up()  # idempotent; a worker process's first task does it
    scorer = MODEL_CACHE.get(spec, n_features)
    # An s3:// member is named by its URI, not by its entry in this host's model cache.
    location = spec.path if spec.path.startswith("s3://") else scorer.source
    return MemberInfo(name=spec.name, format=resolve_model(spec).format, location=location,
                      digest=scorer.digest, load_seconds=scorer.load_seconds,
                      fused_bias_adds=scorer.fused_bias_adds,
                      frozen_variables=scorer.frozen_variables,
                      export_seconds=scorer.export_seconds)


def _present(manifest: Manifest, absent: list[str]) -> dict[str, GraphScorer]:
    """The members that loaded, from this process's cache (loaded here on first use)."""
    return {s.name: MODEL_CACHE.get(s, len(manifest.features)) for s in manifest.models
            if s.name not in absent}


def _golden_check(manifest: Manifest, absent: list[str]) -> GoldenCheck:
    """The golden-set gate, with the members this process loaded (``load_member``)."""
    return check_golden(manifest, _present(manifest, absent), absent)


def _choose_feed(manifest: Manifest, absent: list[str], in_flight: int,
                 previous: FeedChoice | None = None) -> FeedChoice:
    """The feed probe (``loaders.feed``), submitted to the task runner so that with worker
    processes it measures where the scoring runs (a process that then scores, and loads
    every member anyway). ``in_flight``: partitions scored at once; ``previous``: a
    previous run's choice to take instead of timing, within this run's bounds."""
    set_up()
    return probe_members(list(_present(manifest, absent).values()), len(manifest.features),
                         in_flight=in_flight, previous=previous)


@functools.wraps(score_partition)
def _score_partition(*args: Any, **kwargs: Any) -> PartitionResult:
    set_up()  # idempotent; a worker process's first task does it
    return score_partition(*args, **kwargs)


load_member = _retrying(_load_member, "load-member", "load {spec.name}")
score_partition_task = _retrying(_score_partition, "score-partition",
                                 "score {partition.relpath}")
check_ids = _retrying(find_repeated_ids, "check-ids", "ids across partitions")
golden_check = _retrying(_golden_check, "golden-check", "golden check")
choose_feed = _retrying(_choose_feed, "choose-feed", "feed size probe")
