"""FAISS indexes over the memory bank: inner product on unit vectors (= cosine).

FAISS is imported lazily, always after torch (see :func:`load_faiss`), so the
import order is the same wherever mining runs: with torch first, both libraries
may share one libgomp, and the OpenMP thread count is per OS thread, so the
miner thread sets its own with ``faiss.omp_set_num_threads``.

An index is built in small steps (:func:`build_steps`) so the miner thread can go
on searching the old index between steps; the new one is swapped in when complete.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch  # noqa: F401 -- imported before faiss, always (one import order everywhere)

from daemon.tasks.twotower.mining.bank import FloatArray, IdArray

IndexKind = Literal["flat", "ivf", "hnsw"]

_faiss: Any = None

# Rows added per build step: one step should take well under a second on one
# thread, so that searches keep flowing while a new index is built.
_ADD_CHUNK = {"flat": 65536, "ivf": 32768, "hnsw": 4096}
_HNSW_M = 32
_IVF_TRAIN_PER_LIST = 64  # faiss wants >= 39 training points per list; more only costs time


def load_faiss() -> Any:
    """Import faiss (after torch) once and disable its slow small-batch path.

    faiss >= 1.15 computes inner products without BLAS while nq * d < 128000
    (faiss PR 5022): a batch of 256 queries at d=128 is ~4x slower than with BLAS.
    ``distance_compute_blas_threshold = 0`` uses BLAS for every batch size. It is a
    process-wide setting of faiss, set here and nowhere else.
    """
    global _faiss
    if _faiss is None:
        import faiss

        faiss.cvar.distance_compute_blas_threshold = 0
        _faiss = faiss
    return _faiss


class NeighbourIndex(Protocol):
    """What the miner needs of an index: its size and a k-NN search returning doc ids."""

    ntotal: int

    def search(self, queries: FloatArray, k: int) -> tuple[FloatArray, IdArray]: ...


@dataclass
class BankIndex:
    """A FAISS index over a bank snapshot; maps FAISS rows back to document ids."""

    kind: IndexKind
    index: Any
    doc_ids: IdArray
    built_step: int

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: FloatArray, k: int) -> tuple[FloatArray, IdArray]:
        """Scores and document ids ([nq, k]; id -1 where the index has fewer than k hits)."""
        k = min(k, self.ntotal)
        scores, rows = self.index.search(queries, k)
        ids = np.where(rows >= 0, self.doc_ids[np.maximum(rows, 0)], -1)
        return scores, ids


def ivf_lists(n: int) -> int:
    """Number of IVF lists for n vectors: ~sqrt(n), with at least 39 training points per list."""
    return max(1, min(int(math.sqrt(n)), n // 39, 65536))


def build_steps(
    kind: IndexKind,
    doc_ids: IdArray,
    vecs: FloatArray,
    built_step: int,
    rng: np.random.Generator,
    search_k: int,
) -> Iterator[BankIndex | None]:
    """Build an index in steps: yields None after each step and the finished index last."""
    faiss = load_faiss()
    n, dim = vecs.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = ivf_lists(n)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        train_n = min(n, nlist * _IVF_TRAIN_PER_LIST)
        sample = vecs if train_n == n else vecs[np.sort(rng.choice(n, train_n, replace=False))]
        index.train(sample)
        index.nprobe = min(nlist, max(8, nlist // 8))
        yield None
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, _HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 40
        index.hnsw.efSearch = max(64, 2 * search_k)
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    chunk = _ADD_CHUNK[kind]
    for lo in range(0, n, chunk):
        index.add(vecs[lo : lo + chunk])
        if lo + chunk < n:
            yield None
    yield BankIndex(kind=kind, index=index, doc_ids=doc_ids, built_step=built_step)
