"""The trainer's facade: alignment, window, positives, ttl, sources, fallback, health, metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from daemon.tasks.twotower.config import MiningConfig
from daemon.tasks.twotower.mining import HardNegativeMiner, Negatives
from daemon.tasks.twotower.mining.bank import FloatArray, IdArray
from daemon.tasks.twotower.mining.miner import THREAD_NAME

torch.set_num_threads(1)

DIM = 32
CLUSTER = 8
B = 32


def unit(x: np.ndarray) -> FloatArray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@dataclass
class Corpus:
    """Near-duplicate clusters of 8 documents; query i is a slightly perturbed document i."""

    docs: FloatArray
    queries: FloatArray
    order: IdArray  # the training order: batch t is order[t*B:(t+1)*B]

    def batch(self, t: int) -> IdArray:
        return self.order[t * B : (t + 1) * B]


def make_corpus(n_clusters: int = 256, seed: int = 0) -> Corpus:
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((n_clusters, DIM)))
    noise = rng.standard_normal((n_clusters, CLUSTER, DIM)) * np.sqrt(0.15 / DIM)
    docs = unit(centres[:, None, :] + noise).reshape(-1, DIM)
    queries = unit(docs + rng.standard_normal(docs.shape) * np.sqrt(0.02 / DIM))
    return Corpus(docs, queries, rng.permutation(len(docs)))


CORPUS = make_corpus()


def config(**kw: object) -> MiningConfig:
    base: dict[str, object] = {
        "enabled": True,
        "start_epoch": 0,
        "qbatch": 4 * B,
        "ttl": 5,
        "prefetch": 2,
        "num_negatives": 8,
        "hardneg_frac": 0.5,
        "cos_min": 0.84,
        "cos_max": 0.96,
        "refresh_steps": 10_000,
        "fifo_max": 8,
        "index": "flat",
        "faiss_threads": 1,
        "max_pos_ratio": 0.0,  # the false-negative filter has its own tests (TestFalseNegatives)
    }
    base.update(kw)
    return MiningConfig.model_validate(base)


def started(
    cfg: MiningConfig, hook: Callable[[], None] | None = None
) -> tuple[HardNegativeMiner, CollectorRegistry]:
    """A started miner whose bank holds the whole corpus and whose index is built."""
    registry = CollectorRegistry()
    miner = HardNegativeMiner.from_config(cfg, len(CORPUS.docs), DIM, registry, seed=1, before_search=hook)
    miner.observe_docs(torch.arange(len(CORPUS.docs)), torch.from_numpy(CORPUS.docs))
    miner.start()
    wait_until(lambda: miner.status()["index_docs"] == len(CORPUS.docs))
    return miner, registry


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


def expected_hard(items: IdArray, cfg: MiningConfig, n_hard: int, search_k: int) -> list[set[int]]:
    """Brute force: the top search_k by inner product, minus the positive, inside the window, best n_hard."""
    q = CORPUS.queries[items]
    cos = q @ CORPUS.docs.T
    top = np.argsort(-cos, axis=1)[:, :search_k]
    out = []
    for row, item in enumerate(items):
        keep = [
            int(d) for d in top[row] if d != item and cfg.cos_min <= cos[row, d] <= cfg.cos_max
        ]
        out.append(set(keep[:n_hard]))
    return out


def train(
    miner: HardNegativeMiner, steps: int, step_seconds: float = 0.0, by_ids: bool = False
) -> list[tuple[int, Negatives, float]]:
    """The trainer's loop: bank update, submit the batches ahead, negatives for this batch."""
    out = []
    for t in range(steps):
        items = CORPUS.batch(t)
        miner.observe_docs(torch.from_numpy(items), torch.from_numpy(CORPUS.docs[items]))
        for key in miner.upcoming(t):
            ahead = CORPUS.batch(key)
            if by_ids:
                miner.submit_ids(t, key, torch.from_numpy(ahead))
            else:
                miner.submit(t, key, torch.from_numpy(CORPUS.queries[ahead]), torch.from_numpy(ahead))
        t0 = time.perf_counter()
        neg = miner.mine(t, t, torch.from_numpy(CORPUS.queries[items]), torch.from_numpy(items))
        out.append((t, neg, time.perf_counter() - t0))
        time.sleep(step_seconds)
    return out


class TestAlignment:
    """The negatives used for batch t are exactly those mined for batch t's queries."""

    def test_under_random_miner_delays(self) -> None:
        cfg = config()
        rng = np.random.default_rng(3)
        miner, _ = started(cfg, lambda: time.sleep(float(rng.uniform(0, 0.02))))
        try:
            steps = train(miner, 40, step_seconds=0.004)
        finally:
            assert miner.stop(5)
        used = [(t, neg) for t, neg, _ in steps if neg.source != "fallback"]
        assert len(used) >= 10, "the miner should keep up with most steps"
        k = miner.miner._k
        for t, neg in used:
            items = CORPUS.batch(t)
            want = expected_hard(items, cfg, miner.n_hard, k)
            for row in range(B):
                got = set(neg.ids[row, : miner.n_hard][neg.mined[row, : miner.n_hard]].tolist())
                assert got == want[row], f"batch {t} row {row}"
        for _, neg, _ in steps:
            if neg.source == "fallback":
                assert not neg.mined.any()

    def test_a_result_for_other_positives_is_never_applied(self) -> None:
        miner, _ = started(config())
        try:
            items = CORPUS.batch(0)
            miner.submit(0, 0, CORPUS.queries[items], items)
            wait_until(lambda: miner.queue_depths().out_q == 1)
            with capture_logs() as logs:
                neg = miner.mine(0, 0, CORPUS.queries[items], CORPUS.batch(1))  # another batch's ids
                miner.submit(0, 1, CORPUS.queries[items[:8]], items[:8])
                wait_until(lambda: miner.queue_depths().out_q == 1)
                neg2 = miner.mine(0, 1, CORPUS.queries[items], items)  # 32 rows, mined for 8
        finally:
            assert miner.stop(5)
        assert neg.source == neg2.source == "fallback"
        assert not neg.mined.any() and not neg2.mined.any()
        assert miner.status()["mismatches"] == 2
        assert sum("do not fit this batch" in e["event"] for e in logs) == 1  # logged once


class TestNegativesContent:
    """Positives never appear; mined negatives lie in the cosine window; the mix follows hardneg_frac."""

    @pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
    def test_positives_window_and_shapes(self, kind: str) -> None:
        cfg = config(index=kind)
        miner, _ = started(cfg)
        try:
            steps = train(miner, 12, step_seconds=0.01)
        finally:
            assert miner.stop(5)
        mined_total = 0
        for t, neg, _ in steps:
            items = CORPUS.batch(t)
            assert neg.vecs.shape == (B, cfg.num_negatives, DIM) and neg.vecs.dtype == torch.float32
            np.testing.assert_array_equal(neg.vecs.numpy(), CORPUS.docs[neg.ids])
            assert not (neg.ids == items[:, None]).any()
            assert not neg.mined[:, miner.n_hard :].any()
            cos = np.einsum("bne,be->bn", neg.vecs.numpy(), CORPUS.queries[items])[neg.mined]
            assert ((cos >= cfg.cos_min) & (cos <= cfg.cos_max)).all()
            mined_total += int(neg.mined.sum())
        assert mined_total > 0
        # the window drops some candidates: their slots are refilled from the bank
        assert any((~neg.mined[:, : miner.n_hard]).any() for _, neg, _ in steps if neg.source != "fallback")


    def test_negatives_are_the_rows_read_when_mined(self) -> None:
        """A bank row may move between the search and the step: the negatives keep the rows
        the miner thread read (the window was checked on those), for the mined slots and
        the memory-bank slots alike; a step with no result reads the bank of now."""
        cfg = config()
        miner, _ = started(cfg)
        items = CORPUS.batch(0)
        try:
            miner.submit(0, 0, CORPUS.queries[items], items)
            wait_until(lambda: miner.queue_depths().out_q == 1)
            moved = -CORPUS.docs  # every document trained again since: all now far away
            miner.observe_docs(torch.arange(len(moved)), torch.from_numpy(moved))
            neg = miner.mine(0, 0, CORPUS.queries[items], items)
            late = miner.mine(1, 1, CORPUS.queries[items], items)  # never submitted
        finally:
            assert miner.stop(5)
        assert neg.source == "fresh" and neg.mined.any() and not neg.mined.all()
        vecs = neg.vecs.numpy()
        cos = np.einsum("bne,be->bn", vecs, CORPUS.queries[items])[neg.mined]
        assert ((cos >= cfg.cos_min) & (cos <= cfg.cos_max)).all()
        np.testing.assert_array_equal(vecs, CORPUS.docs[neg.ids])
        assert late.source == "fallback"
        np.testing.assert_array_equal(late.vecs.numpy(), moved[late.ids])


class _Gate:
    """Holds every FAISS call until opened; counts the calls that entered."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.open = threading.Event()

    def __call__(self) -> None:
        self.entered.release()
        self.open.wait(10)


class TestTtlAndSources:
    """A call's first batch is fresh, its later ones reused, anything older than ttl falls back."""

    def test_fresh_reused_and_stale(self) -> None:
        gate = _Gate()
        miner, registry = started(config(ttl=5, prefetch=8), gate)
        try:
            batches = {key: CORPUS.batch(i) for i, key in enumerate([1, 20, 21, 22])}
            miner.submit(0, 1, CORPUS.queries[batches[1]], batches[1])
            assert gate.entered.acquire(timeout=5)  # call 0 holds batch 1
            for key in (20, 21, 22):
                miner.submit(0, key, CORPUS.queries[batches[key]], batches[key])
            assert miner.queue_depths() == (3, 0, 4)
            gate.open.set()
            wait_until(lambda: miner.queue_depths().out_q == 4)  # call 1 mined 20, 21, 22 at step 0
            got = [
                miner.mine(step, key, CORPUS.queries[batches[key]], batches[key])
                for step, key in [(1, 1), (3, 20), (5, 21), (6, 22)]
            ]
        finally:
            gate.open.set()
            assert miner.stop(5)
        assert [n.source for n in got] == ["fresh", "fresh", "reused", "fallback"]
        assert [n.age for n in got] == [1, 3, 5, None]  # both calls started at step 0
        assert miner.status()["stale"] == 1
        for source, count in {"fresh": 2, "reused": 1, "fallback": 1}.items():
            assert registry.get_sample_value("minerd_mining_batches_total", {"source": source}) == count

    def test_lookahead_makes_calls_serve_several_batches(self) -> None:
        """prefetch=2 with lookahead 5: a call mines ~4 batches, so reused outnumbers fresh."""
        miner, _ = started(config(ttl=5, prefetch=2))
        try:
            steps = train(miner, 30, step_seconds=0.01)
        finally:
            assert miner.stop(5)
        sources = [neg.source for _, neg, _ in steps[5:]]
        assert sources.count("reused") > sources.count("fresh") > 0
        assert all(neg.age is None or neg.age <= 5 for _, neg, _ in steps)

    def test_upcoming_keeps_lookahead_batches_submitted(self) -> None:
        miner, _ = started(config(ttl=3, fifo_max=8))
        try:
            assert miner.lookahead == 3
            assert list(miner.upcoming(10)) == [11, 12, 13]
            items = CORPUS.batch(0)
            for key in miner.upcoming(10):
                assert miner.submit(10, key, CORPUS.queries[items], items)
            assert list(miner.upcoming(10)) == []
            assert list(miner.upcoming(11)) == [14]
            assert miner.queue_depths().fifo == 3
        finally:
            assert miner.stop(5)


class TestSubmitIds:
    """With observed query embeddings the trainer submits item ids only, and alignment still holds."""

    def test_query_bank_path(self) -> None:
        cfg = config()
        miner, _ = started(cfg)
        try:
            items = CORPUS.batch(0)
            assert not miner.submit_ids(0, 1, items)  # no query embedding observed yet
            miner.observe_queries(np.arange(len(CORPUS.docs)), CORPUS.queries)
            steps = train(miner, 15, step_seconds=0.005, by_ids=True)
        finally:
            assert miner.stop(5)
        used = [(t, neg) for t, neg, _ in steps if neg.source != "fallback"]
        assert len(used) >= 5
        for t, neg in used:
            want = expected_hard(CORPUS.batch(t), cfg, miner.n_hard, miner.miner._k)
            for row in range(B):
                got = neg.ids[row, : miner.n_hard][neg.mined[row, : miner.n_hard]]
                assert set(got.tolist()) == want[row]


class TestFallback:
    """A slow or dead miner sends steps to memory-bank negatives, and the trainer never waits."""

    def test_slow_miner_never_blocks_the_trainer(self) -> None:
        miner, registry = started(config(), lambda: time.sleep(1.0))
        try:
            steps = train(miner, 8)
        finally:
            assert miner.stop(5)
        assert all(neg.source == "fallback" for _, neg, _ in steps)
        assert max(seconds for _, _, seconds in steps) < 0.25  # the miner sleeps 1 s per call
        assert registry.get_sample_value("minerd_mining_batches_total", {"source": "fallback"}) == 8

    def test_dead_miner_falls_back_with_a_metric(self) -> None:
        class Fatal(BaseException):
            pass

        def die() -> None:
            raise Fatal("injected")

        miner, registry = started(config(), die)
        try:
            items = CORPUS.batch(0)
            assert miner.submit(0, 0, CORPUS.queries[items], items)
            wait_until(lambda: not miner.miner.alive)
            assert not miner.submit(0, 1, CORPUS.queries[items], items)
            steps = train(miner, 4)
        finally:
            assert miner.stop(5)
        assert all(neg.source == "fallback" and not neg.mined.any() for _, neg, _ in steps)
        assert registry.get_sample_value("minerd_mining_errors_total") == 1
        status = miner.status()
        assert status["alive"] is False and "injected" in status["crashed"]

    def test_not_started_or_disabled_is_all_fallback(self) -> None:
        registry = CollectorRegistry()
        miner = HardNegativeMiner.from_config(config(enabled=False), len(CORPUS.docs), DIM, registry, 0)
        miner.observe_docs(np.arange(len(CORPUS.docs)), CORPUS.docs)
        miner.start()
        items = CORPUS.batch(0)
        assert not miner.submit(0, 1, CORPUS.queries[items], items)
        vecs, source = miner.negatives(0, 0, torch.from_numpy(CORPUS.queries[items]), items)
        assert source == "fallback" and vecs.shape == (B, 8, DIM)
        assert not miner.active(10)
        assert miner.stop(1)


class TestHealthAndMetrics:
    """The queue-health line operators grep for, its out_q=0 warning, the gauges and the index refreshes."""

    def test_queue_health_line_and_warning(self) -> None:
        gate = _Gate()
        miner, registry = started(config(prefetch=8), gate)
        try:
            for key in range(3):
                items = CORPUS.batch(key)
                miner.submit(0, key, CORPUS.queries[items], items)
                if key == 0:
                    assert gate.entered.acquire(timeout=5)  # call 0 holds batch 0
            with capture_logs() as logs:
                assert miner.queue_health_line(200) == "[Queue Health @ step 200] in_q=2, out_q=0, fifo=3"
                assert not logs
                miner.queue_health_line(400)
            assert any("increase mining.prefetch" in e["event"] for e in logs)
            assert registry.get_sample_value("minerd_mining_queue_depth", {"queue": "in"}) == 2
            assert registry.get_sample_value("minerd_mining_queue_depth", {"queue": "out"}) == 0
            assert registry.get_sample_value("minerd_mining_fifo_depth") == 3
            gate.open.set()
            wait_until(lambda: miner.queue_depths().out_q == 3)
            assert registry.get_sample_value("minerd_mining_queue_depth", {"queue": "out"}) == 3
            with capture_logs() as logs:
                assert miner.queue_health_line(600).endswith("in_q=0, out_q=3, fifo=3")
            assert not logs
        finally:
            gate.open.set()
            assert miner.stop(5)

    def test_index_refreshed_every_refresh_steps(self) -> None:
        miner, registry = started(config(refresh_steps=5))
        try:
            train(miner, 12, step_seconds=0.005)
            wait_until(lambda: registry.get_sample_value("minerd_mining_index_refreshes_total") == 3)
            status = miner.status()
            assert status["index_built_step"] >= 10
            assert status["searches"] == registry.get_sample_value("minerd_mining_search_seconds_count")
        finally:
            assert miner.stop(5)

    def test_status_is_json_and_stop_leaves_no_thread(self) -> None:
        import json

        miner, _ = started(config())
        train(miner, 6, step_seconds=0.005)
        json.dumps(miner.status())
        t0 = time.monotonic()
        assert miner.stop(5)
        assert time.monotonic() - t0 < 5
        assert THREAD_NAME not in [t.name for t in threading.enumerate()]


class TestFalseNegatives:
    """Candidates that are the positive under another id, or score nearly as high as it, are
    dropped before they become negatives, and counted."""

    def _miner(self, content: np.ndarray | None, ratio: float) -> tuple[HardNegativeMiner, CollectorRegistry]:
        registry = CollectorRegistry()
        miner = HardNegativeMiner.from_config(config(max_pos_ratio=ratio), 6, 2, registry, seed=1, content=content)
        return miner, registry

    def test_a_planted_duplicate_and_a_candidate_above_the_ratio(self) -> None:
        # Document 0 is the query's positive (score 1.0). 1 holds 0's very content; 2 scores 0.97
        # (above 0.95 x 1.0); 3 scores 0.90 and 4 scores 0.50 (kept); 5 is a duplicate of 4 only.
        angle = lambda c: [c, float(np.sqrt(1 - c * c))]  # noqa: E731
        docs = np.array([angle(1.0), angle(1.0), angle(0.97), angle(0.90), angle(0.50), angle(0.50)], np.float32)
        content = np.array([7, 7, 1, 2, 3, 3])
        miner, registry = self._miner(content, 0.95)
        miner.observe_docs(torch.arange(6), torch.from_numpy(docs))
        query = np.array([angle(1.0)], np.float32)
        cand = np.array([[1, 2, 3, 4, 5, -1]])
        rows = miner.bank.gather(np.maximum(cand, 0))
        kept = miner._drop_false_negatives(cand, rows, np.array([[0]]), query)
        assert kept.tolist() == [[-1, -1, 3, 4, 5, -1]]
        assert miner.status()["filtered"] == {"ratio": 1, "duplicate": 1}
        for reason in ("ratio", "duplicate"):
            assert registry.get_sample_value("minerd_mining_filtered_total", {"reason": reason}) == 1

    def test_off_and_a_positive_scoring_below_zero(self) -> None:
        docs = np.array([[0.0, 1.0], [0.6, 0.8], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], np.float32)
        for ratio, query in ((0.0, [[1.0, 0.0]]), (0.95, [[0.0, -1.0]])):
            miner, _ = self._miner(None, ratio)
            miner.observe_docs(torch.arange(6), torch.from_numpy(docs))
            cand = np.array([[1, 2]])
            kept = miner._drop_false_negatives(cand, miner.bank.gather(cand), np.array([[0]]),
                                               np.array(query, np.float32))
            assert kept.tolist() == [[1, 2]]  # nothing to compare with: nothing dropped

    def test_mining_drops_near_duplicates_of_the_positive(self) -> None:
        """End to end through FAISS: with the filter no mined negative scores above 0.95 times
        the query's positive, and the counter says how many were dropped."""
        miner, registry = started(config(max_pos_ratio=0.95))
        try:
            steps = train(miner, 8, step_seconds=0.01)
        finally:
            assert miner.stop(5)
        mined = 0
        for t, neg, _ in steps:
            items = CORPUS.batch(t)
            q = CORPUS.queries[items]
            pos = np.einsum("be,be->b", CORPUS.docs[items], q)
            cos = np.einsum("bne,be->bn", neg.vecs.numpy(), q)
            assert (cos[neg.mined] <= (0.95 * pos[:, None].repeat(neg.mined.shape[1], 1))[neg.mined] + 1e-6).all()
            mined += int(neg.mined.sum())
        assert mined > 0
        assert registry.get_sample_value("minerd_mining_filtered_total", {"reason": "ratio"}) > 0
