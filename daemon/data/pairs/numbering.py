"""Pairs numbered into the two-tower corpus: which documents there are, in which order, and
what each training document trains with.

Documents are numbered training ones first, then those only held-out queries point at:
every document is searched at evaluation, only the first ones are trained. A training
document keeps every training query that names it (the epochs take turns among them) and
the negatives its pairs name (each text held once, however many pairs name it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from daemon.data.pairs.split import Pair, is_held_out

# A document answered by thousands of queries (a boilerplate function, a FAQ entry) would
# otherwise take that many epochs to cycle; past these the rest add little.
MAX_QUERIES_PER_DOCUMENT = 32
MAX_NEGATIVES_PER_DOCUMENT = 16


@dataclass
class Numbered:
    docs: list[str] = field(default_factory=list)
    queries: list[list[str]] = field(default_factory=list)  # per training document, first one first
    negatives: list[list[int]] = field(default_factory=list)  # per training document, rows of negative_texts
    negative_texts: list[str] = field(default_factory=list)
    eval_queries: list[str] = field(default_factory=list)
    eval_targets: list[int] = field(default_factory=list)
    pairs: int = 0

    @property
    def num_train(self) -> int:
        return len(self.queries)


def number(pairs: Iterable[Pair], eval_fraction: float, eval_queries: int) -> Numbered:
    """The numbered corpus of ``pairs`` (read once, in order)."""
    out = Numbered()
    doc_id: dict[str, int] = {}
    negative_row: dict[str, int] = {}
    held: list[Pair] = []
    for pair in pairs:
        out.pairs += 1
        if is_held_out(pair, eval_fraction):
            held.append(pair)
            continue
        i = doc_id.get(pair.document)
        if i is None:
            i = doc_id[pair.document] = len(out.docs)
            out.docs.append(pair.document)
            out.queries.append([])
            out.negatives.append([])
        queries = out.queries[i]
        if pair.query not in queries and len(queries) < MAX_QUERIES_PER_DOCUMENT:
            queries.append(pair.query)
        named = out.negatives[i]
        for text in pair.negatives:
            if text == pair.document or len(named) >= MAX_NEGATIVES_PER_DOCUMENT:
                continue  # a pair naming its own document as a negative contradicts itself
            row = negative_row.setdefault(text, len(out.negative_texts))
            if row == len(out.negative_texts):
                out.negative_texts.append(text)
            if row not in named:
                named.append(row)
    # A fixed, spread-out choice of held-out queries: by the hash of the query, not file order.
    held.sort(key=lambda p: hashlib.sha256(p.query.encode() + b"\0" + p.document.encode()).digest())
    for pair in held[:eval_queries]:
        if pair.document not in doc_id:
            doc_id[pair.document] = len(out.docs)
            out.docs.append(pair.document)
        out.eval_queries.append(pair.query)
        out.eval_targets.append(doc_id[pair.document])
    return out
