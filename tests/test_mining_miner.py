"""The background miner: index kinds, batching, prefetch, threads, errors and stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from daemon.tasks.twotower.mining import AsyncMiner, MemoryBank
from daemon.tasks.twotower.mining.bank import FloatArray
from daemon.tasks.twotower.mining.index import build_steps, load_faiss
from daemon.tasks.twotower.mining.metrics import MiningMetrics, QueueDepths
from daemon.tasks.twotower.mining.miner import THREAD_NAME

torch.set_num_threads(1)

DIM = 32
CLUSTER = 8


def unit(x: np.ndarray) -> FloatArray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered_docs(n_clusters: int, seed: int = 0) -> FloatArray:
    """Near-duplicate clusters of 8: siblings have cosine ~0.87, strangers ~0."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((n_clusters, DIM)))
    noise = rng.standard_normal((n_clusters, CLUSTER, DIM)) * np.sqrt(0.15 / DIM)
    return unit(centres[:, None, :] + noise).reshape(-1, DIM)


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


class Gate:
    """A before_search seam that holds each FAISS call until released."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.open = threading.Event()

    def __call__(self) -> None:
        self.entered.release()
        self.open.wait(10)


def make_miner(
    docs: FloatArray, hook: Callable[[], None] | None = None, **kw: object
) -> tuple[AsyncMiner, CollectorRegistry]:
    bank = MemoryBank(len(docs), DIM)
    bank.update(np.arange(len(docs)), docs)
    registry = CollectorRegistry()
    metrics = MiningMetrics(registry, lambda: QueueDepths(0, 0, 0))
    args: dict[str, object] = {"kind": "flat", "qbatch": 4096, "prefetch": 100, "search_k": 8}
    args.update(kw)
    miner = AsyncMiner(bank, metrics=metrics, before_search=hook, **args)  # type: ignore[arg-type]
    miner.start()
    miner.request_refresh()
    wait_until(lambda: miner.status()["index_docs"] == len(docs))
    return miner, registry


@pytest.fixture
def docs() -> FloatArray:
    return clustered_docs(64)


class TestIndexKinds:
    """flat, ivf and hnsw find a query's cluster siblings (inner product on unit vectors)."""

    @pytest.mark.parametrize(("kind", "min_recall"), [("flat", 1.0), ("ivf", 0.9), ("hnsw", 0.9)])
    def test_recall_of_siblings(self, kind: str, min_recall: float) -> None:
        docs = clustered_docs(256)
        steps = list(build_steps(kind, np.arange(len(docs)), docs, 0, np.random.default_rng(0), 8))  # type: ignore[arg-type]
        index = steps[-1]
        assert index is not None and index.kind == kind and index.ntotal == len(docs)
        queries = docs[::CLUSTER]
        _, ids = index.search(queries, 8)
        truth = np.argsort(-(queries @ docs.T), axis=1)[:, :8]
        recall = np.mean([len(set(a) & set(b)) / 8 for a, b in zip(ids, truth, strict=True)])
        assert recall >= min_recall

    @pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
    def test_async_miner_serves_each_kind(self, kind: str, docs: FloatArray) -> None:
        miner, _ = make_miner(docs, kind=kind)
        try:
            task = miner.submit(0, docs[:16])
            wait_until(lambda: miner.ready_count == 1)
            assert miner.try_get() is task
            assert task.ids is not None and task.ids.shape == (16, 8)
            assert (task.ids[:, 0] == np.arange(16)).all()  # each doc finds itself first
        finally:
            assert miner.stop(5)

    def test_small_batches_use_blas(self) -> None:
        assert load_faiss().cvar.distance_compute_blas_threshold == 0


class TestBatchingAndPrefetch:
    """One call takes every pending batch up to qbatch; calls pause while prefetch results wait."""

    def test_pending_batches_share_a_call_up_to_qbatch(self, docs: FloatArray) -> None:
        gate = Gate()
        miner, registry = make_miner(docs, gate, qbatch=48)
        try:
            tasks = [miner.submit(0, docs[:16])]
            assert gate.entered.acquire(timeout=5)  # call 0 holds task 0
            tasks += [miner.submit(i, docs[16 * i : 16 * i + 16]) for i in range(1, 6)]
            assert miner.pending_count == 5 and miner.in_flight == 1
            gate.open.set()
            wait_until(lambda: miner.ready_count == 6)
            assert [t.call_id for t in tasks] == [0, 1, 1, 1, 2, 2]
            assert registry.get_sample_value("minerd_mining_search_seconds_count") == 3
        finally:
            assert miner.stop(5)

    def test_prefetch_bounds_ready_results(self, docs: FloatArray) -> None:
        miner, _ = make_miner(docs, qbatch=16, prefetch=2)
        try:
            for i in range(5):
                miner.submit(i, docs[16 * i : 16 * i + 16])
            wait_until(lambda: miner.ready_count == 2)
            time.sleep(0.2)
            assert (miner.ready_count, miner.pending_count) == (2, 3)
            first = miner.try_get()
            assert first is not None and first.batch_idx == 0
            # the freed slot lets exactly one more call run
            wait_until(lambda: miner.pending_count == 2 and miner.ready_count == 2)
            time.sleep(0.1)
            assert (miner.ready_count, miner.pending_count) == (2, 2)
        finally:
            assert miner.stop(5)

    def test_try_get_until_leaves_later_batches_ready(self, docs: FloatArray) -> None:
        miner, _ = make_miner(docs)
        try:
            for i in (3, 4, 7):
                miner.submit(i, docs[:4])
            wait_until(lambda: miner.ready_count == 3)
            got = [miner.try_get(until=4), miner.try_get(until=4), miner.try_get(until=4)]
            assert [t.batch_idx if t else None for t in got] == [3, 4, None]
            assert miner.ready_count == 1
        finally:
            assert miner.stop(5)

    def test_refresh_swaps_in_the_current_bank(self, docs: FloatArray) -> None:
        miner, registry = make_miner(docs)
        try:
            probe = unit(np.ones((1, DIM)))
            miner._bank.update([5], probe)  # doc 5 now points where the probe does
            assert registry.get_sample_value("minerd_mining_index_refreshes_total") == 1
            miner.request_refresh()
            wait_until(lambda: registry.get_sample_value("minerd_mining_index_refreshes_total") == 2)
            miner.submit(0, probe)
            wait_until(lambda: miner.ready_count == 1)
            task = miner.try_get()
            assert task is not None and task.ids is not None and task.ids[0, 0] == 5
        finally:
            assert miner.stop(5)


class TestThreads:
    """FAISS threads are set inside the miner thread; stop joins it within the deadline."""

    def test_omp_threads_are_per_miner_thread(self, docs: FloatArray) -> None:
        faiss = load_faiss()
        seen: list[int] = []
        faiss.omp_set_num_threads(1)
        miner, _ = make_miner(docs, lambda: seen.append(faiss.omp_get_max_threads()), faiss_threads=2)
        try:
            miner.submit(0, docs[:4])
            wait_until(lambda: miner.ready_count == 1)
            assert seen == [2]
            assert faiss.omp_get_max_threads() == 1  # the caller's count is untouched
        finally:
            assert miner.stop(5)

    def test_stop_joins_within_deadline_during_a_slow_search(self, docs: FloatArray) -> None:
        entered = threading.Event()

        def slow() -> None:
            entered.set()
            time.sleep(0.3)

        miner, _ = make_miner(docs, slow)
        miner.submit(0, docs[:4])
        assert entered.wait(5)
        t0 = time.monotonic()
        assert miner.stop(5)
        assert time.monotonic() - t0 < 5
        assert THREAD_NAME not in [t.name for t in threading.enumerate()]
        assert not miner.alive


class _Fatal(BaseException):
    """Escapes the per-call error handling: kills the thread."""


class TestErrors:
    """A failed call is logged, counted and survived; a dying thread is logged and counted."""

    def test_failed_search_is_counted_and_the_thread_goes_on(self, docs: FloatArray) -> None:
        calls: list[int] = []

        def hook() -> None:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected search failure")

        with capture_logs() as logs:
            miner, registry = make_miner(docs, hook)
            try:
                lost = miner.submit(0, docs[:4])
                wait_until(lambda: len(calls) == 1 and miner.in_flight == 0)
                served = miner.submit(1, docs[:4])
                wait_until(lambda: miner.ready_count == 1)
                assert miner.try_get() is served and lost.ids is None
                assert miner.alive
                assert registry.get_sample_value("minerd_mining_errors_total") == 1
            finally:
                assert miner.stop(5)
        assert any("injected search failure" in str(e.get("error")) for e in logs)

    def test_thread_death_is_logged_and_counted(self, docs: FloatArray) -> None:
        def hook() -> None:
            raise _Fatal("injected death")

        with capture_logs() as logs:
            miner, registry = make_miner(docs, hook)
            miner.submit(0, docs[:4])
            wait_until(lambda: not miner.alive)
            assert miner.stop(5)
        assert miner.crashed is not None and "injected death" in miner.crashed
        assert registry.get_sample_value("minerd_mining_errors_total") == 1
        assert any(e["event"].startswith("mining thread crashed") for e in logs)
