"""The background FAISS search thread.

One thread (never a forked process: a forked child hangs in ``search()`` once the
parent searched with several OpenMP threads) owns the index. It takes the batches
submitted so far, up to ``qbatch`` queries per FAISS call, while fewer than
``prefetch`` mined results wait to be used; it (re)builds the index from a memory
bank snapshot in small steps between searches and swaps the new index in when it
is complete. FAISS releases the GIL while it searches, adds and trains, so the
training thread keeps running meanwhile.

Errors: a failed search or build is logged, counted, and the thread goes on (the
batches of a failed search get no result: the trainer falls back for them). If the
thread itself dies, that is logged with its traceback, counted, and
:attr:`AsyncMiner.alive` turns False, which sends every later step to the fallback.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from daemon.tasks.twotower.mining.bank import FloatArray, IdArray, MemoryBank
from daemon.tasks.twotower.mining.index import BankIndex, IndexKind, build_steps, load_faiss
from daemon.tasks.twotower.mining.metrics import MiningMetrics

log = structlog.get_logger(__name__)

THREAD_NAME = "minerd-mining"
_IDLE_WAIT_S = 1.0  # the condition is always notified; this only bounds a lost wake-up
_LOG_FIRST_ERRORS = 3  # then every 100th, so a persistent failure does not flood the log


@dataclass(eq=False)
class MineTask:
    """One batch's queries and, once mined, its candidates. Compared by identity."""

    batch_idx: int
    queries: FloatArray  # [B, E]
    positives: IdArray | None = None  # [B, P] the consumer's, for its ``prepare`` callback
    cancelled: bool = False  # set by the consumer: the miner skips it if not yet taken
    ids: IdArray | None = None  # [B, k] document ids, best first, -1 where none
    scores: FloatArray | None = None  # [B, k] inner products against the index's vectors
    # What the consumer's ``prepare`` made of the result, in the miner thread (None without one).
    prepared: Any = None
    mined_step: int = -1  # the trainer's step when the FAISS call started
    call_id: int = -1  # the FAISS call that mined it (calls are numbered from 0)


class AsyncMiner:
    """Searches submitted query batches in a background thread; results come back in order.

    ``submit`` and ``try_get`` never block beyond a short lock held only for deque
    operations. ``clock`` returns the trainer's current step (stamped on each result);
    ``before_search`` is a test seam called in the miner thread before each FAISS call:
    it may sleep (a slow miner) or raise (a failing one).
    """

    def __init__(
        self,
        bank: MemoryBank,
        *,
        kind: IndexKind = "flat",
        qbatch: int = 2048,
        prefetch: int = 3,
        faiss_threads: int = 1,
        search_k: int = 32,
        clock: Callable[[], int] = lambda: 0,
        metrics: MiningMetrics | None = None,
        seed: int = 0,
        before_search: Callable[[], None] | None = None,
        prepare: Callable[[MineTask], None] | None = None,
    ) -> None:
        self._bank = bank
        self._kind: IndexKind = kind
        self._qbatch = qbatch
        self._prefetch = prefetch
        self._threads = faiss_threads
        self._k = search_k
        self._clock = clock
        self._metrics = metrics
        self._rng = np.random.default_rng(seed)  # used by the miner thread only (IVF training sample)
        self._before_search = before_search
        self._prepare = prepare

        self._cond = threading.Condition()
        self._pending: deque[MineTask] = deque()
        self._ready: deque[MineTask] = deque()
        self._in_flight = 0
        self._stopping = False
        self._refresh_wanted = False
        self._auto_build = True  # build as soon as there is work and no index (off after a failure)
        self._thread: threading.Thread | None = None

        # Written by the miner thread; read elsewhere only for status (plain attribute reads).
        self._index: BankIndex | None = None
        self._builder: Iterator[BankIndex | None] | None = None
        self._build_started = 0.0
        self._calls = 0
        self._queries = 0
        self._last_search_s = 0.0
        self._refreshes = 0
        self._errors = 0
        self._last_error: str | None = None
        self.crashed: str | None = None

    # -- the consumer's side (training thread) ---------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the miner was already started")
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Started, not stopped, and not dead."""
        t = self._thread
        return t is not None and t.is_alive() and not self._stopping and self.crashed is None

    def submit(self, batch_idx: int, queries: FloatArray, positives: IdArray | None = None) -> MineTask:
        """Queue a batch's query vectors ([B, E] float32) for mining; returns its task."""
        task = MineTask(batch_idx=batch_idx, queries=queries, positives=positives)
        with self._cond:
            self._pending.append(task)
            self._cond.notify()
        return task

    def try_get(self, until: int | None = None) -> MineTask | None:
        """The oldest mined result, or None; with ``until``, only one whose batch_idx <= until.

        Results come back in submission order, so a consumer that trains batches in
        that order pops the results of earlier batches first; results of later batches
        stay ready (and count toward ``prefetch``).
        """
        with self._cond:
            if not self._ready or (until is not None and self._ready[0].batch_idx > until):
                return None
            task = self._ready.popleft()
            self._cond.notify()
            return task

    def request_refresh(self) -> None:
        """Rebuild the index from a fresh bank snapshot (in the miner thread, then swap it in)."""
        with self._cond:
            self._refresh_wanted = True
            self._auto_build = True
            self._cond.notify()

    @property
    def pending_count(self) -> int:
        """Submitted, not cancelled, not yet taken into a FAISS call."""
        with self._cond:
            return sum(1 for t in self._pending if not t.cancelled)

    @property
    def ready_count(self) -> int:
        return len(self._ready)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def stop(self, timeout: float) -> bool:
        """Ask the thread to end and join it within ``timeout`` seconds; True when it has ended.

        A FAISS call cannot be interrupted: the thread ends after the current one
        (or the current build step). It is a daemon thread, so a call stuck past the
        deadline does not keep the process alive.
        """
        with self._cond:
            self._stopping = True
            self._pending.clear()
            self._cond.notify_all()
        t = self._thread
        if t is None:
            return True
        t.join(timeout)
        if t.is_alive():
            log.warning("mining thread did not stop within the deadline", timeout_s=timeout)
            return False
        return True

    def status(self) -> dict[str, Any]:
        index = self._index
        return {
            "alive": self.alive,
            "crashed": self.crashed,
            "index": self._kind,
            "index_docs": index.ntotal if index is not None else 0,
            "index_built_step": index.built_step if index is not None else None,
            "building": self._builder is not None,
            "refreshes": self._refreshes,
            "searches": self._calls,
            "queries_searched": self._queries,
            "last_search_seconds": round(self._last_search_s, 6),
            "errors": self._errors,
            "last_error": self._last_error,
        }

    # -- the miner thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            faiss = load_faiss()
            # Per OS thread: this sets the miner's count only, not the trainer's.
            faiss.omp_set_num_threads(self._threads)
            log.info("mining thread started", index=self._kind, faiss_threads=self._threads)
            self._loop()
        except BaseException as exc:  # a dying thread must say so, whatever killed it
            self.crashed = f"{type(exc).__name__}: {exc}"
            self._errors += 1
            self._last_error = self.crashed
            if self._metrics is not None:
                self._metrics.errors.inc()
            log.error(
                "mining thread crashed; every step now uses memory-bank negatives",
                error=self.crashed,
                exc_info=exc,
            )
        finally:
            with self._cond:
                self._in_flight = 0
                self._cond.notify_all()
            log.info("mining thread exited", searches=self._calls, refreshes=self._refreshes)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    has_work = any(not t.cancelled for t in self._pending)
                    if (
                        self._index is None
                        and self._builder is None
                        and self._auto_build
                        and has_work
                        and self._bank.filled_count > 0
                    ):
                        self._refresh_wanted = True
                    start_build = self._refresh_wanted and self._builder is None
                    can_search = (
                        has_work and self._index is not None and len(self._ready) < self._prefetch
                    )
                    if start_build or can_search or self._builder is not None:
                        break
                    self._cond.wait(_IDLE_WAIT_S)
                if start_build:
                    self._refresh_wanted = False
                tasks = self._take() if can_search else []
            if start_build:
                self._start_build()
            if tasks:
                self._search(tasks)
            if self._builder is not None:
                self._build_step()

    def _take(self) -> list[MineTask]:
        """Pending tasks in order, up to qbatch queries (at least one task). Holds the lock."""
        tasks: list[MineTask] = []
        n = 0
        while self._pending:
            task = self._pending[0]
            if task.cancelled:
                self._pending.popleft()
                continue
            if tasks and n + len(task.queries) > self._qbatch:
                break
            tasks.append(self._pending.popleft())
            n += len(task.queries)
        self._in_flight = len(tasks)
        return tasks

    def _search(self, tasks: list[MineTask]) -> None:
        index = self._index
        assert index is not None
        call_id = self._calls
        self._calls += 1
        mined_step = self._clock()
        try:
            if self._before_search is not None:
                self._before_search()
            queries = tasks[0].queries if len(tasks) == 1 else np.concatenate([t.queries for t in tasks])
            t0 = time.perf_counter()
            scores, ids = index.search(queries, self._k)
            self._last_search_s = time.perf_counter() - t0
            lo = 0
            for task in tasks:
                hi = lo + len(task.queries)
                task.ids, task.scores = ids[lo:hi], scores[lo:hi]
                task.mined_step, task.call_id = mined_step, call_id
                if self._prepare is not None and not task.cancelled:
                    self._prepare(task)
                lo = hi
        except Exception as exc:
            self._error("mining search failed; these batches use memory-bank negatives", exc)
            with self._cond:
                self._in_flight = 0
            return
        if self._metrics is not None:
            self._metrics.search_seconds.observe(self._last_search_s)
        self._queries += len(queries)
        with self._cond:
            self._ready.extend(tasks)
            self._in_flight = 0

    def _start_build(self) -> None:
        try:
            doc_ids, vecs = self._bank.snapshot()
            if len(doc_ids) == 0:
                log.info("mining index not built: the memory bank is empty")
                return
            self._build_started = time.perf_counter()
            self._builder = build_steps(self._kind, doc_ids, vecs, self._clock(), self._rng, self._k)
        except Exception as exc:
            self._build_failed(exc)

    def _build_step(self) -> None:
        assert self._builder is not None
        try:
            built = next(self._builder)
        except Exception as exc:
            self._build_failed(exc)
            return
        if built is None:
            return
        self._index = built  # the swap: one reference assignment, seen by the next search
        self._builder = None
        self._refreshes += 1
        if self._metrics is not None:
            self._metrics.index_refreshes.inc()
        log.info(
            "mining index built",
            index=built.kind,
            docs=built.ntotal,
            step=built.built_step,
            seconds=round(time.perf_counter() - self._build_started, 3),
        )

    def _build_failed(self, exc: Exception) -> None:
        self._builder = None
        with self._cond:
            self._auto_build = False  # retried on the next request_refresh, not in a loop
        self._error("mining index build failed; keeping the previous index", exc)

    def _error(self, what: str, exc: Exception) -> None:
        self._errors += 1
        self._last_error = f"{what}: {type(exc).__name__}: {exc}"
        if self._metrics is not None:
            self._metrics.errors.inc()
        if self._errors <= _LOG_FIRST_ERRORS or self._errors % 100 == 0:
            log.error(what, error=f"{type(exc).__name__}: {exc}", errors=self._errors, exc_info=exc)
