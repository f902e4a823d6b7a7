"""Counting the training configs of a quorum: which replica group leaves when they differ."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from daemon.sync.torchft.vote import QuorumWatch, digest_of, replica_id, verdict

A, B = "6a72d3291f0c33e5", "0123456789abcdef"


def ids(*digests: str) -> list[str]:
    return [f"{replica_id(d, i)}:5f0c-uuid" for i, d in enumerate(digests)]


@pytest.mark.parametrize(("quorum", "expected"), [
    ((A,), "same"),
    ((A, A, A), "same"),
    ((A, A, B), "majority"),
    ((A, B, B), "minority"),
    ((A, B), "tie"),
    ((), "same"),  # this replica alone, whatever the quorum listed
])
def test_verdict(quorum: tuple[str, ...], expected: str) -> None:
    assert verdict(A, ids(*quorum))[0] == expected


def test_counts_and_foreign_ids() -> None:
    standing, counts = verdict(A, [*ids(A, A), "someone-else:uuid"])
    assert standing == "majority" and counts == {A: 2, "?": 1}
    assert digest_of(replica_id(B, 12) + ":x") == B and digest_of("minerd_zz_1") == "?"


def test_the_watch_keeps_each_quorums_ids_and_passes_the_rest() -> None:
    seen: list[list[str]] = []

    class Client:
        def _quorum(self, **kwargs: object) -> SimpleNamespace:
            return SimpleNamespace(replica_ids=ids(A, B), step=kwargs["step"])

        def should_commit(self, *args: object) -> bool:
            return True

    watch = QuorumWatch(Client(), seen.append)
    assert watch._quorum(step=3).step == 3 and seen == [ids(A, B)]
    assert watch.should_commit(0, 3, True) is True
