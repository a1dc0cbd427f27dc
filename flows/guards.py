"""The run's guards against scores that are wrong without an error, as the flow runs them.

- the golden-set gate (``tasks.golden``): before any partition is touched;
- the member quorum (``min_members``): which members may be missing, decided when they
  load (the per-row part is in ``tasks.batch``);
- the drift report (``tasks.drift``): this run's sketches against a baseline run's.

Each reports to the flow's log, an artifact and the run summary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from flows.records import DriftRecord, Sketches
from flows.report import publish_safely
from loaders.errors import ModelLoadError, ScoringError
from loaders.manifest import Manifest, ModelSpec
from tasks.drift import (
    MAJOR_PSI,
    MODERATE_PSI,
    drift_lines,
    merge_sketches,
    render_drift_markdown,
)
from tasks.merge import PartitionMerged
from tasks.plan import MemberInfo
from tasks.storage import read_json

__all__ = [
    "apply_quorum",
    "compare_with_baseline",
    "missing_member",
    "run_sketches",
]

DRIFT_ARTIFACT = "ensemble-drift"
GOLDEN_ARTIFACT = "ensemble-golden"


def missing_member(spec: ModelSpec, err: BaseException) -> MemberInfo:
    """A member that could not be loaded, as the run reports it."""
    text = str(err) if isinstance(err, ScoringError) else f"{type(err).__name__}: {err}"
    return MemberInfo(name=spec.name, format="-", location=spec.path, digest="", missing=text)


def apply_quorum(manifest: Manifest, members: Sequence[MemberInfo], quorum: int,
                 logger: Any) -> None:
    """Go on without the members that failed to load only while ``quorum`` remain.

    Raises:
        ModelLoadError: fewer than ``quorum`` members loaded, naming each failure.
    """
    missing = [m for m in members if m.missing]
    if not missing:
        return
    loaded = len(members) - len(missing)
    listing = "\n".join(f"  - {m.name}: {m.missing}" for m in missing)
    if loaded < quorum:
        needed = ("every member is needed (no min_members set)" if quorum == len(members)
                  else f"min_members is {quorum}")
        raise ModelLoadError(
            f"{len(missing)} of {len(members)} member(s) could not be loaded, leaving "
            f"{loaded}, fewer than needed ({needed}); nothing was scored:\n{listing}\n"
            "Repair them, or set min_members lower to score without them")
    for m in missing:
        logger.error(f"MEMBER MISSING: {m.name} could not be loaded and is left out of this "
                     f"run (score_{m.name} is null in the partitions this run scores; "
                     f"{loaded} of {len(members)} members meet min_members={quorum}): "
                     f"{m.missing}")


def publish_golden(text: str, manifest: Manifest, logger: Any) -> None:
    from prefect.artifacts import create_markdown_artifact

    publish_safely(logger, "golden check", lambda: create_markdown_artifact(
        f"# Golden check\n\n`{manifest.golden}`: {text}\n", key=GOLDEN_ARTIFACT,
        description="Blessed rows scored by every member before the run"))


# ---------------------------------------------------------------------------- drift


def run_sketches(merged: Mapping[str, PartitionMerged]) -> Sketches:
    """The run's sketches: each partition's (reused ones keep theirs in their footer)."""
    parts = [merged[r] for r in sorted(merged)]
    return Sketches(features=merge_sketches([p.feature_sketches for p in parts
                                             if p.feature_sketches]),
                    scores=merge_sketches([p.score_sketches for p in parts
                                           if p.score_sketches]))


def read_baseline(location: str, *, required: bool = False) -> tuple[Sketches, str] | None:
    """A run record's sketches and a description of it; None when it has none (a record
    from before sketches were kept, or, unless ``required``, no record at all).

    Raises:
        ValueError: the record is not a run record, or is ``required`` and missing.
    """
    try:
        data = read_json(location)
    except FileNotFoundError as err:
        if required:
            raise ValueError(f"the drift baseline {location} does not exist") from err
        return None
    except (OSError, ValueError) as err:
        raise ValueError(f"the drift baseline {location} cannot be read as a run record "
                         f"({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"the drift baseline {location} is not a run record")
    try:
        sketches = Sketches.model_validate(data.get("sketches") or {})
    except ValidationError as err:
        raise ValueError(f"the drift baseline {location} holds malformed sketches "
                         f"({err.error_count()} problem(s))") from err
    if not sketches.features and not sketches.scores:
        return None
    when = data.get("finished_at", "?")
    return sketches, f"run of {when} (flow run {data.get('flow_run_id', '?')}, {location})"


def compare_with_baseline(current: Sketches, baseline: tuple[Sketches, str] | None,
                          names: Sequence[str]) -> DriftRecord | None:
    """PSI per feature, per member and for the ensemble score, largest first."""
    if baseline is None:
        return None
    before, description = baseline
    kinds = {f"score_{n}": "member" for n in names} | {"ensemble_score": "ensemble"}
    lines = (drift_lines(before.features, current.features, {})
             + drift_lines(before.scores, current.scores, kinds))
    lines.sort(key=lambda d: (d.psi is None, -(d.psi or 0.0), d.column))
    top = max((d.psi for d in lines if d.psi is not None), default=None)
    # Columns in only one of the two runs (a renamed feature, a new member) have no PSI:
    # listed, so a rename is seen rather than dropped.
    then = {*before.features, *before.scores}
    now = {*current.features, *current.scores}
    return DriftRecord(baseline=description, lines=lines, max_psi=top,
                       only_baseline=sorted(then - now), only_current=sorted(now - then))


def publish_drift(record: DriftRecord, logger: Any) -> None:
    from prefect.artifacts import create_markdown_artifact

    publish_safely(logger, "drift", lambda: create_markdown_artifact(
        render_drift_markdown(record.lines, record.baseline) + record.unmatched_markdown(),
        key=DRIFT_ARTIFACT,
        description=f"Population stability index against the baseline ({MODERATE_PSI} / "
        f"{MAJOR_PSI} bands)"))
    for line in record.text():
        logger.info(f"drift: {line}")
