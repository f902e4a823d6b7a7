"""Which training configs a quorum runs: every replica group's digest, counted.

A replica group's torchft id is ``minerd_<training digest>_<group>`` (torchft adds
``:<uuid>``), so each quorum says which configs its members run. Groups that run
another model or other data must never be averaged together. A digest is what a peer
says of itself, so no count of them decides anything final: a quorum with a foreign
digest in it is one this replica takes no update and no state from, and it trains on
alone until the quorum is clean again (a forged majority cannot make an honest miner
leave). Which config is right is for the operator to decide.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

REPLICA_ID = re.compile(r"minerd_([0-9a-f]+)_[0-9]+")

def replica_id(digest: str, group: int) -> str:
    return f"minerd_{digest}_{group}"


def digest_of(rid: str) -> str:
    """The training digest in a replica id; "?" for an id minerd did not make."""
    m = REPLICA_ID.fullmatch(rid.split(":", 1)[0])
    return m.group(1) if m else "?"


def foreign(mine: str, replica_ids: list[str]) -> dict[str, int]:
    """The digests of a quorum other than ``mine``, each with the number of groups saying it."""
    counts = Counter(digest_of(r) for r in replica_ids)
    return {d: c for d, c in counts.items() if d != mine}


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
