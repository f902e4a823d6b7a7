"""Rankers and metrics for the retrieval evaluation: towers (dense dot product), BM25 over
the same token ids, and reciprocal-rank fusion of both.

Every ranker returns, per query, the top-``k`` document ids (row indices of the document
set) best first, as an ``int64`` array ``[num_queries, k]`` (``k`` is clipped to the number
of documents). Equal scores are ordered by lower id, so a run is reproducible whatever the
chunking or the thread count.

BM25 uses ``bm25s`` with its default ``method="lucene"`` (Kamphuis et al., ECIR 2020)::

    idf(t)     = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))
    score(q,d) = sum over tokens t of q (repeats count again) of
                 idf(t) * tf(t,d) / (tf(t,d) + k1 * (1 - b + b * |d| / avgdl))

with k1 = 1.5, b = 0.75. The numerator has no ``(k1 + 1)``: Lucene dropped it, and it does
not change the order.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import torch

if TYPE_CHECKING:
    from numpy.typing import NDArray

# Per-query ranked document ids: an int array [num_queries, k] or one list per query.
Rankings: TypeAlias = "np.ndarray | Sequence[Sequence[int]]"

RRF_K = 60
# Scores held at once while ranking (queries x documents, float32): 2^24 is 64 MiB, so
# 10k queries x 1M documents go through in chunks of 16 queries.
DEFAULT_MAX_SCORES = 1 << 24


@dataclass(frozen=True)
class RetrievalMetrics:
    recall_at_1: float
    recall_at_10: float
    mrr_at_10: float
    num_queries: int


def _first_hit_ranks(ranked: Rankings, relevant: Sequence[Collection[int]], k: int) -> list[int]:
    """1-based rank of the first relevant id within each query's top ``k``, 0 if none."""
    if len(ranked) != len(relevant):
        raise ValueError(f"{len(ranked)} rankings for {len(relevant)} relevance sets")
    if len(relevant) == 0:
        raise ValueError("no queries to score")
    ranks = []
    for row, rel in zip(ranked, relevant, strict=True):
        hit = 0
        for i, doc in enumerate(list(row)[:k]):
            if int(doc) in rel:
                hit = i + 1
                break
        ranks.append(hit)
    return ranks


def recall_at_k(ranked: Rankings, relevant: Sequence[Collection[int]], k: int) -> float:
    """Share of queries with a relevant document among their first ``k`` ids."""
    ranks = _first_hit_ranks(ranked, relevant, k)
    return sum(1 for r in ranks if r > 0) / len(ranks)


def mrr_at_k(ranked: Rankings, relevant: Sequence[Collection[int]], k: int) -> float:
    """Mean over queries of 1 / rank of the first relevant id in the top ``k`` (0 if none)."""
    ranks = _first_hit_ranks(ranked, relevant, k)
    return sum(1.0 / r for r in ranks if r > 0) / len(ranks)


def retrieval_metrics(ranked: Rankings, relevant: Sequence[Collection[int]]) -> RetrievalMetrics:
    """recall@1, recall@10 and MRR@10 of ``ranked`` ."""
    ranks = _first_hit_ranks(ranked, relevant, 10)
    n = len(ranks)
    return RetrievalMetrics(
        recall_at_1=sum(1 for r in ranks if r == 1) / n,
        recall_at_10=sum(1 for r in ranks if r > 0) / n,
        mrr_at_10=sum(1.0 / r for r in ranks if r > 0) / n,
        num_queries=n,
    )


def topk_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` column ids of each row of ``scores`` [rows, n], best first, ties by lower id.

    ``torch.topk`` picks arbitrarily among equal values, so the set is rebuilt from its
    k-th value: every id scoring above it, then the lowest ids scoring exactly it.
    """
    rows, n = scores.shape
    k = min(k, n)
    if rows == 0 or k == 0:
        return torch.empty(rows, k, dtype=torch.int64)
    # One extra value tells whether the k-th value is shared beyond the cut; scanning the
    # whole row for it would cost as much as the matmul.
    top = torch.topk(scores, min(k + 1, n), dim=1, sorted=True)
    kth = top.values[:, k - 1 : k]
    boundary_ties = top.values[:, k] == kth[:, 0] if k < n else torch.zeros(rows, dtype=torch.bool)
    if bool(boundary_ties.any()):
        # Only rows whose k-th value is shared pay for the cumulative count.
        above = scores > kth
        chosen = scores >= kth
        t = boundary_ties.nonzero().squeeze(1)
        equal = scores[t] == kth[t]
        room = k - above[t].sum(dim=1, keepdim=True)
        chosen[t] = above[t] | (equal & (equal.cumsum(dim=1) <= room))
        # nonzero walks row by row in id order, so each row yields exactly k ascending ids.
        ids = chosen.nonzero()[:, 1].view(rows, k)
    else:
        # The common case with float embeddings: topk's set is already the right one.
        ids = torch.sort(top.indices[:, :k], dim=1).values
    # A stable descending sort keeps equal scores in that ascending id order.
    order = torch.sort(scores.gather(1, ids), dim=1, descending=True, stable=True).indices
    return ids.gather(1, order)


def dense_topk(
    queries: torch.Tensor | np.ndarray,
    docs: torch.Tensor | np.ndarray,
    k: int,
    max_scores: int = DEFAULT_MAX_SCORES,
) -> NDArray[np.int64]:
    """Top-``k`` document ids per query by dot product of ``queries`` [Q, E] and ``docs`` [N, E].

    Scores are computed for as many queries at a time as fit in ``max_scores`` floats, so
    memory stays bounded however many queries there are. Runs on the tensors' device.
    """
    q = torch.as_tensor(queries).float()
    d = torch.as_tensor(docs).float().to(q.device)
    if q.dim() != 2 or d.dim() != 2 or q.shape[1] != d.shape[1]:
        raise ValueError(f"queries {tuple(q.shape)} and docs {tuple(d.shape)} must be [Q, E] and [N, E]")
    chunk = max(1, max_scores // max(1, d.shape[0]))
    out = torch.empty(q.shape[0], min(k, d.shape[0]), dtype=torch.int64)
    with torch.no_grad():
        for start in range(0, q.shape[0], chunk):
            scores = q[start : start + chunk] @ d.T
            out[start : start + chunk] = topk_rows(scores, k).cpu()
    return out.numpy()


class _Columns(Sequence[list[int]]):
    """Each document's tokens as dense columns, made one document at a time when bm25s
    walks the corpus: a million documents never become a million Python lists at once."""

    def __init__(self, docs: Sequence[Sequence[int]] | np.ndarray, column: np.ndarray, pad: int | None) -> None:
        self._docs, self._column, self._pad = docs, column, pad

    def __len__(self) -> int:
        return len(self._docs)

    def _one(self, doc: Sequence[int] | np.ndarray) -> list[int]:
        ids = np.asarray(doc, dtype=np.int64).reshape(-1)
        if self._pad is not None:
            ids = ids[ids != self._pad]
        return self._column[ids].tolist()

    def __getitem__(self, i: int) -> list[int]:  # type: ignore[override]
        return self._one(self._docs[i])

    def __iter__(self) -> Iterator[list[int]]:
        for doc in self._docs:
            yield self._one(doc)


class BM25Ranker:
    """BM25 index over documents given as token ids (the task's BPE ids, any ints >= 0).

    bm25s indexes columns 0..V-1 of its own vocabulary; its plain list-of-int input path
    takes the ids as those columns without remapping them, which breaks for sparse BPE ids.
    So the ids seen in the corpus are mapped here to dense columns and handed over as a
    ``bm25s.tokenization.Tokenized``; queries go through the same map, ids never seen in a
    document are dropped (they would score 0 anyway), and scoring uses
    ``BM25.get_scores_from_ids``, so the ranking and its tie order stay ours.

    ``docs`` is one sequence of ids per document, or a 2-D array of rows padded with
    ``pad`` (dropped): read row by row, so the index is the only copy of a large corpus.
    """

    def __init__(self, docs: Sequence[Sequence[int]] | np.ndarray, k1: float = 1.5, b: float = 0.75,
                 pad: int | None = None) -> None:
        import bm25s  # 0.15 s of imports (tqdm and friends): only when BM25 is used

        if len(docs) == 0:
            raise ValueError("BM25 needs at least one document")
        present = np.zeros(0, dtype=bool)
        for start in range(0, len(docs), 8192):
            part = docs[start:start + 8192]
            flat = (np.asarray(part, dtype=np.int64).reshape(-1) if isinstance(docs, np.ndarray)
                    else np.fromiter((t for doc in part for t in doc), dtype=np.int64))
            if pad is not None:
                flat = flat[flat != pad]
            if flat.size == 0:
                continue
            if int(flat.min()) < 0:
                raise ValueError("token ids must be >= 0")
            top = int(flat.max())
            if top >= present.size:
                present = np.concatenate([present, np.zeros(top + 1 - present.size, dtype=bool)])
            present[flat] = True
        seen = np.flatnonzero(present)
        if seen.size == 0:
            raise ValueError("BM25 needs at least one token in the documents")
        # Dense lookup table token id -> column (-1: not in any document).
        self._column = np.full(int(seen[-1]) + 1, -1, dtype=np.int64)
        self._column[seen] = np.arange(seen.size)
        vocab = {str(int(t)): i for i, t in enumerate(seen)}
        self._bm25 = bm25s.BM25(k1=k1, b=b, method="lucene")
        self._bm25.index(
            bm25s.tokenization.Tokenized(ids=_Columns(docs, self._column, pad), vocab=vocab),
            create_empty_token=False,
            show_progress=False,
        )
        self.num_docs = len(docs)

    @property
    def index_bytes(self) -> int:
        """Size of the sparse score matrix (CSC data, indices, indptr)."""
        s = self._bm25.scores
        return int(s["data"].nbytes + s["indices"].nbytes + s["indptr"].nbytes)

    def scores(self, query: Sequence[int]) -> NDArray[np.float32]:
        """BM25 score of every document for one query of token ids."""
        q = np.asarray(query, dtype=np.int64)
        q = q[(q >= 0) & (q < self._column.size)]
        cols = self._column[q]
        cols = cols[cols >= 0]
        if cols.size == 0:
            return np.zeros(self.num_docs, dtype=np.float32)
        return np.asarray(self._bm25.get_scores_from_ids(cols.tolist()), dtype=np.float32)

    def topk(self, queries: Sequence[Sequence[int]], k: int, max_scores: int = DEFAULT_MAX_SCORES) -> NDArray[np.int64]:
        """Top-``k`` document ids per query, best first, ties (e.g. all-zero scores) by lower id."""
        chunk = max(1, max_scores // self.num_docs)
        out = np.empty((len(queries), min(k, self.num_docs)), dtype=np.int64)
        for start in range(0, len(queries), chunk):
            block = np.stack([self.scores(q) for q in queries[start : start + chunk]])
            out[start : start + chunk] = topk_rows(torch.from_numpy(block), k).numpy()
        return out


def rrf_fuse(rankings: Sequence[Rankings], k: int, rrf_k: int = RRF_K) -> NDArray[np.int64]:
    """Reciprocal-rank fusion of several rankings of the same queries.

    score(d) = sum over rankers r of 1 / (rrf_k + rank_r(d)), ranks from 1; a document
    absent from a ranker's list gets nothing from it. Returns the top ``k`` by fused score,
    ties by lower id; a query with fewer than ``k`` distinct ids is padded with -1.
    """
    if not rankings:
        raise ValueError("nothing to fuse")
    n = len(rankings[0])
    if any(len(r) != n for r in rankings):
        raise ValueError(f"rankings cover different numbers of queries: {[len(r) for r in rankings]}")
    out = np.full((n, k), -1, dtype=np.int64)
    for qi in range(n):
        ids_parts, weight_parts = [], []
        for ranking in rankings:
            row = np.asarray(ranking[qi], dtype=np.int64).reshape(-1)
            ids_parts.append(row)
            weight_parts.append(1.0 / (rrf_k + np.arange(1, row.size + 1, dtype=np.float64)))
        ids = np.concatenate(ids_parts)
        weights = np.concatenate(weight_parts)
        if ids.size == 0:
            continue
        # Sum each document's terms in a fixed order (by weight), so documents holding the
        # same ranks in different rankers get bit-identical scores and tie exactly.
        order = np.lexsort((weights, ids))
        ids, weights = ids[order], weights[order]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        docs, fused = ids[starts], np.add.reduceat(weights, starts)
        best = np.lexsort((docs, -fused))[:k]
        out[qi, : best.size] = docs[best]
    return out
