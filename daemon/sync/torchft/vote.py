"""Which training config a quorum runs: every replica group's digest, counted.

A replica group's torchft id is ``minerd_<training digest>_<group>`` (torchft adds
``:<uuid>``), so each quorum says which configs its members run. Groups that run
another model or other data must never be averaged together, and one such group must
not stop the others: the group whose digest is in the minority leaves (exit 2 with one
line), the majority goes on without it. With no majority (one group against one), the
groups refuse each other's updates and say so at each outer step; which config is
right is for the operator to decide.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

REPLICA_ID = re.compile(r"minerd_([0-9a-f]+)_[0-9]+")

Verdict = Literal["same", "majority", "minority", "tie"]


def replica_id(digest: str, group: int) -> str:
    return f"minerd_{digest}_{group}"


def digest_of(rid: str) -> str:
    """The training digest in a replica id; "?" for an id minerd did not make."""
    m = REPLICA_ID.fullmatch(rid.split(":", 1)[0])
    return m.group(1) if m else "?"


def verdict(mine: str, replica_ids: list[str]) -> tuple[Verdict, dict[str, int]]:
    """Where ``mine`` stands in a quorum of ``replica_ids``, and the count of each digest."""
    counts = Counter(digest_of(r) for r in replica_ids)
    counts[mine] = max(counts[mine], 1)  # this replica, whatever the quorum listed
    others = max((c for d, c in counts.items() if d != mine), default=0)
    if others == 0:
        return "same", dict(counts)
    if counts[mine] > others:
        return "majority", dict(counts)
    return ("minority" if counts[mine] < others else "tie"), dict(counts)


class QuorumWatch:
    """Wraps torchft's manager client to keep each quorum's replica ids (torchft uses them
    to number the members and keeps no copy); everything else passes through."""

    def __init__(self, client: Any, seen: Callable[[list[str]], None]) -> None:
        self._client = client
        self._seen = seen

    def _quorum(self, *args: Any, **kwargs: Any) -> Any:
        result = self._client._quorum(*args, **kwargs)
        self._seen(list(result.replica_ids))
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)
