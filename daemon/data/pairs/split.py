"""A (query, document) pair, and which pairs are held out for evaluation.

A pair is held out by a hash of its group, or of its document when it has none: the
split is the same on every run, machine and file order, and every pair of a group
(all the functions of one source file, say) falls on the same side, so no evaluation
query has a near-twin among the training pairs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from daemon.data.text.corpus import held_out


@dataclass(frozen=True)
class Pair:
    query: str
    document: str
    negatives: tuple[str, ...] = ()  # documents known not to answer the query, if the data has them
    group: str | None = None  # pairs of one group are held out together


def split_key(pair: Pair) -> str:
    # The prefixes keep a group named like some document apart from that document.
    return f"group\0{pair.group}" if pair.group is not None else f"document\0{pair.document}"


def is_held_out(pair: Pair, eval_fraction: float) -> bool:
    """Whether ``pair`` is for evaluation: sha256 of its key, never Python's ``hash()``,
    which changes from one process to the next."""
    return held_out(split_key(pair), eval_fraction)


def split(pairs: Iterable[Pair], eval_fraction: float, held: bool) -> Iterator[Pair]:
    """The training pairs (``held=False``) or the held-out ones (``held=True``), in order."""
    for pair in pairs:
        if is_held_out(pair, eval_fraction) == held:
            yield pair
