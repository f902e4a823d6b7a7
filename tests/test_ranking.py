"""Rankers and metrics of the retrieval evaluation (daemon/tasks/twotower/ranking.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from daemon.tasks.twotower.ranking import (
    BM25Ranker,
    dense_topk,
    mrr_at_k,
    recall_at_k,
    retrieval_metrics,
    rrf_fuse,
    topk_rows,
)


def test_metrics_hand_computed() -> None:
    ranked = [
        [3, 1, 4, 15, 9, 2, 6, 8, 10, 11, 12, 13],  # relevant 3 at rank 1
        [0, 1, 2, 7, 4, 5, 6, 8, 9, 10, 11, 12],  # relevant 7 at rank 4
        [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 5, 11],  # relevant 5 at rank 11: outside the top 10
        [4, 9, 1, 3, 2, 0, 5, 6, 7, 8, 10, 11],  # relevant {2, 9}: first hit 9 at rank 2
    ]
    relevant = [{3}, {7}, {5}, {2, 9}]
    m = retrieval_metrics(np.array(ranked), relevant)
    # recall@1  = 1 query of 4 with a hit at rank 1           = 1/4 = 0.25
    # recall@10 = 3 queries of 4 with a hit in the top 10     = 3/4 = 0.75
    # MRR@10    = (1/1 + 1/4 + 0 + 1/2) / 4 = 1.75 / 4        = 0.4375
    assert m.recall_at_1 == 0.25
    assert m.recall_at_10 == 0.75
    assert m.mrr_at_10 == 0.4375
    assert m.num_queries == 4
    assert recall_at_k(ranked, relevant, 1) == 0.25
    assert recall_at_k(ranked, relevant, 12) == 1.0  # the rank-11 hit now counts
    # MRR@3 = (1 + 0 + 0 + 1/2) / 4 = 0.375
    assert mrr_at_k(ranked, relevant, 3) == 0.375
    with pytest.raises(ValueError):
        retrieval_metrics(ranked, relevant[:3])


# Sparse, large ids on purpose: the task hands BPE ids, not 0..V-1.
DOCS = [
    [10, 20, 30],
    [10, 10, 40],
    [50, 60, 70, 80, 90, 10],
    [20, 40, 50],
    [1000, 1000],
]


def lucene_bm25(query: list[int], docs: list[list[int]], k1: float = 1.5, b: float = 0.75) -> list[float]:
    """Textbook BM25, Lucene variant (bm25s's default method="lucene")."""
    n = len(docs)
    avgdl = sum(len(d) for d in docs) / n
    out = []
    for doc in docs:
        s = 0.0
        for t in query:
            df = sum(1 for d in docs if t in d)
            tf = doc.count(t)
            if df == 0 or tf == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            s += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        out.append(s)
    return out


def test_bm25_orders_hand_checked() -> None:
    bm25 = BM25Ranker(DOCS)
    queries = [
        [1000],  # only doc 4 has it; the rest score 0 and follow by id
        [10],  # doc 1 has it twice; doc 0 once in 3 tokens beats doc 2 once in 6; docs 3, 4 have none
        [20, 40],  # doc 3 has both; docs 0 (20) and 1 (40) tie (same df, tf, length): lower id first
        [99999, 7],  # no document has these ids: all zero, order by id
    ]
    got = bm25.topk(queries, k=5)
    assert got.tolist() == [[4, 0, 1, 2, 3], [1, 0, 2, 3, 4], [3, 0, 1, 2, 4], [0, 1, 2, 3, 4]]
    assert bm25.topk(queries, k=2, max_scores=5).tolist() == [[4, 0], [1, 0], [3, 0], [0, 1]]


@pytest.mark.parametrize("query", [[10], [20, 40], [10, 10, 50], [1000, 30, 60], [5]])
def test_bm25_scores_match_lucene_formula(query: list[int]) -> None:
    got = BM25Ranker(DOCS).scores(query)
    np.testing.assert_allclose(got, lucene_bm25(query, DOCS), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("query", [[10], [20, 40], [10, 10, 50], [1000, 30, 60]])
def test_bm25_of_padded_rows_equals_lists(query: list[int]) -> None:
    """The corpus's form (rows padded with 0, read one at a time) scores as the lists do."""
    width = max(len(d) for d in DOCS)
    padded = np.zeros((len(DOCS), width), dtype=np.int64)
    for i, doc in enumerate(DOCS):
        padded[i, :len(doc)] = doc
    np.testing.assert_allclose(BM25Ranker(padded, pad=0).scores(query), lucene_bm25(query, DOCS), rtol=1e-6, atol=1e-7)


def test_rrf_hand_computed() -> None:
    a = [[0, 1, 2, 3]]
    b = [[2, 0, 3, 1]]
    # d0 = 1/61 + 1/62 = 0.016393 + 0.016129 = 0.032522
    # d2 = 1/63 + 1/61 = 0.015873 + 0.016393 = 0.032266
    # d1 = 1/62 + 1/64 = 0.016129 + 0.015625 = 0.031754
    # d3 = 1/64 + 1/63 = 0.015625 + 0.015873 = 0.031498
    assert rrf_fuse([a, b], k=4).tolist() == [[0, 2, 1, 3]]
    # Docs 0 and 1 both get 1/61 + 1/62: the tie goes to the lower id.
    assert rrf_fuse([[[1, 0]], [[0, 1]]], k=2).tolist() == [[0, 1]]
    # Missing from a list scores nothing from it: 5 -> 1/61, 7 -> 1/61, 6 -> 1/62; padded with -1.
    assert rrf_fuse([np.array([[5, 6]]), [[7]]], k=4).tolist() == [[5, 7, 6, -1]]
    # Three rankers: 9 holds ranks {1, 2, 3}, 8 holds {2, 3, 1}: equal sums, lower id first.
    assert rrf_fuse([[[9, 8]], [[8, 9]], [[7, 8, 9]]], k=3).tolist() == [[8, 9, 7]]


def reference_topk(q: np.ndarray, d: np.ndarray, k: int) -> list[list[int]]:
    s = q.astype(np.int64) @ d.astype(np.int64).T  # exact integer scores
    return [sorted(range(d.shape[0]), key=lambda j, row=row: (-row[j], j))[:k] for row in s]


def test_dense_chunked_equals_unchunked_ties_by_id() -> None:
    rng = np.random.default_rng(0)
    # Small integer embeddings: float32 dot products are exact, and ties are frequent.
    docs = rng.integers(-2, 3, size=(60, 4)).astype(np.float32)
    docs[30:] = docs[:30]  # every document has a twin with a higher id
    queries = rng.integers(-2, 3, size=(9, 4)).astype(np.float32)
    whole = dense_topk(queries, docs, k=10)
    assert whole.shape == (9, 10) and whole.dtype == np.int64
    assert whole.tolist() == reference_topk(queries, docs, 10)
    for max_scores in (1, 60, 150, 10_000):
        np.testing.assert_array_equal(dense_topk(torch.from_numpy(queries), docs, 10, max_scores), whole)
    assert dense_topk(queries, docs, k=100).shape == (9, 60)  # k clipped to the number of documents


def test_topk_rows_boundary_ties() -> None:
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 2.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    assert topk_rows(scores, 2).tolist() == [[0, 1], [3, 1], [0, 1]]


def test_topk_rows_matches_stable_sort_on_floats() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(20, 500, generator=g)
    scores[:, 250:] = scores[:, :250]  # every score twice, so boundary ties are everywhere
    scores[:5] = torch.randn(5, 500, generator=g)  # and some rows without any
    want = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :37]
    assert torch.equal(topk_rows(scores, 37), want)
