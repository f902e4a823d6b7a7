"""Counting the training configs of a quorum: the foreign ones, refused, whatever their number."""

from __future__ import annotations

from types import SimpleNamespace

from daemon.sync.torchft.vote import QuorumWatch, digest_of, foreign, replica_id

A, B = "6a72d3291f0c33e5", "0123456789abcdef"


def ids(*digests: str) -> list[str]:
    return [f"{replica_id(d, i)}:5f0c-uuid" for i, d in enumerate(digests)]


def test_foreign_digests_are_counted_and_mine_is_not() -> None:
    assert foreign(A, ids(A, A, A)) == {} and foreign(A, []) == {}
    # Outnumbered or not, a foreign digest is only a refusal: nothing here decides who leaves.
    assert foreign(A, ids(A, B, B)) == {B: 2} and foreign(A, ids(A, A, B)) == {B: 1}
    assert foreign(A, [*ids(A), "someone-else:uuid"]) == {"?": 1}


def test_digests_of_ids() -> None:
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
