"""What of a partition's committed file a re-run can keep: a pure decision on two records.

The committed file's footer records what produced it (``tasks.writer``): the partition's
fingerprint, the id column, features and bad-row policy, each member's checkpoint digest,
the ensemble method and weights. Compared with the same record for this run, it says
whether the file stands as it is, which members' scores can be copied from it, or that
everything must be scored again. No I/O here, so every case is a unit test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["INPUT_KEYS", "Reuse", "plan_reuse"]

# What the rows and the member scores depend on besides each member's checkpoint.
INPUT_KEYS = ("fingerprint", "id_column", "features", "bad_rows")


@dataclass(frozen=True)
class Reuse:
    """``whole``: the committed file is this run's result as it is. Otherwise ``members``
    (possibly empty) are the members whose scores can be taken from it."""

    whole: bool
    members: tuple[str, ...]


def plan_reuse(previous: dict[str, Any] | None, current: dict[str, Any], *,
               force: bool = False) -> Reuse:
    # ``current["absent"]``: members that could not be loaded in this run (min_members).
    """Compare the committed file's provenance (``previous``; None if there is none or it
    is unreadable) with this run's (``current``, same keys).

    Member scores are reusable only when the rows are the same (same input fingerprint,
    id column, features and bad-row policy) and the member's checkpoint digest is; the
    file is reusable whole when every member is and no other member is in it, and the
    method and the weights are the same.
    """
    if force or not previous:
        return Reuse(False, ())
    if any(previous.get(k) != current[k] for k in INPUT_KEYS):
        return Reuse(False, ())
    before = previous.get("members") or {}
    members = tuple(n for n, digest in current["members"].items() if before.get(n) == digest)
    absent = tuple(current.get("absent") or ())
    if absent and all(n in before for n in absent) and len(members) == len(
            current["members"]) and set(before) == {*members, *absent} and all(
            previous.get(k) == current.get(k) for k in ("method", "weights")):
        # A member that cannot be loaded now was scored into this file when it could:
        # the file stands, rather than losing those scores to a column of nulls.
        return Reuse(True, members)
    # A file from before min_members was recorded needed every member.
    quorum = previous.get("min_members", len(before))
    whole = (len(members) == len(current["members"]) == len(before)
             and previous.get("method") == current["method"]
             and previous.get("weights") == current["weights"]
             and quorum == current.get("min_members", len(current["members"])))
    if not whole and previous.get("scores_set_aside"):
        # Rows were left out for their scores: the file's rows are no longer the input's
        # (less its bad features), so no member's column lines up with this run's rows.
        return Reuse(False, ())
    return Reuse(whole, members)
