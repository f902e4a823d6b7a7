"""The trainer's side of hard-negative mining: the alignment FIFO, TTL, mixing and metrics.

See the package docstring (``daemon.tasks.twotower.mining``) for the per-step protocol and the
fresh / reused / fallback semantics. The per-step methods run on the training thread
and never wait for the miner thread; ``status``, ``queue_depths`` and the metrics
collector may be called from any thread (the API's). One HardNegativeMiner per
metrics registry: it registers the ``minerd_mining_*`` names.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
import torch
from prometheus_client import CollectorRegistry

from daemon.tasks.twotower.config import MiningConfig
from daemon.tasks.twotower.mining.bank import IdArray, MemoryBank, as_numpy_f32, as_numpy_ids
from daemon.tasks.twotower.mining.metrics import SOURCES, MiningMetrics, QueueDepths
from daemon.tasks.twotower.mining.miner import AsyncMiner, MineTask

log = structlog.get_logger(__name__)

BoolArray = npt.NDArray[np.bool_]

# FAISS returns this many candidates per mined negative (plus room for the
# positives): the cosine window and the positives drop some; the rest refill from the bank.
_OVERFETCH = 4
_GATHER_CHUNK = 4096  # bank rows per lock hold: the trainer's bank writes wait at most one chunk
# queue_health_line warns once out_q was 0 at this many checks in a row.
_ZERO_OUT_Q_CHECKS = 2


@dataclass(frozen=True)
class Negatives:
    """The negatives of one step."""

    vecs: torch.Tensor  # [B, num_negatives, E] float32, on the device of the query vectors
    ids: IdArray  # [B, num_negatives] document ids
    mined: BoolArray  # [B, num_negatives] True where the id came from FAISS
    source: str  # "fresh", "reused" or "fallback"
    age: int | None  # steps between the FAISS call and this step; None for the fallback


@dataclass(frozen=True)
class _Prepared:
    """A mined batch's negatives, assembled by the miner thread; the trainer only hands them on."""

    ids: IdArray  # [B, num_negatives]
    mined: BoolArray  # [B, num_negatives]
    vecs: np.ndarray  # [B, num_negatives, E] float32


@dataclass(eq=False)
class _Entry:
    """A FIFO entry: a batch submitted for mining and not yet trained."""

    batch_idx: int
    positive_ids: IdArray  # [B, P]
    task: MineTask


class HardNegativeMiner:
    """Memory bank + background FAISS miner + the per-step logic the trainer calls."""

    def __init__(
        self,
        cfg: MiningConfig,
        bank: MemoryBank,
        registry: CollectorRegistry,
        seed: int,
        *,
        before_search: Callable[[], None] | None = None,
        content: IdArray | None = None,
    ) -> None:
        self.cfg = cfg
        self.bank = bank
        # Per document, a key of its content (equal keys: the same text): a candidate equal to a
        # query's positive is that positive under another id, never a negative.
        self.content = content
        self._filtered = {"ratio": 0, "duplicate": 0}
        self.query_bank: MemoryBank | None = None  # created by the first observe_queries
        self.n_hard = int(cfg.num_negatives * cfg.hardneg_frac)  # floor: a fraction never adds a FAISS slot
        self._rng = np.random.default_rng(seed)
        self._fifo: deque[_Entry] = deque()
        self._step = 0  # the trainer's latest step, read by the miner thread as its clock
        self._last_key: int | None = None  # the last batch key submitted or trained
        self._refresh_from: int | None = None
        self._last_call = -1  # the newest FAISS call a step has used
        self._zero_out_q = 0
        self._started = False
        self._counts = dict.fromkeys(SOURCES, 0)
        self._stale = 0
        self._mismatches = 0
        self._rejected = 0
        self._logged: set[str] = set()
        self._age_sum = 0
        self.metrics = MiningMetrics(registry, self.queue_depths)
        self.miner = AsyncMiner(
            bank,
            kind=cfg.index,
            qbatch=cfg.qbatch,
            prefetch=cfg.prefetch,
            faiss_threads=cfg.faiss_threads,
            search_k=_OVERFETCH * self.n_hard + 4,
            clock=lambda: self._step,
            metrics=self.metrics,
            seed=seed,
            before_search=before_search,
            prepare=self._prepare,
        )
        self._miner_rng = np.random.default_rng(seed + 1)  # the miner thread's bank draws

    @classmethod
    def from_config(
        cls,
        cfg: MiningConfig,
        num_docs: int,
        dim: int,
        registry: CollectorRegistry,
        seed: int,
        *,
        before_search: Callable[[], None] | None = None,
        content: IdArray | None = None,
    ) -> HardNegativeMiner:
        """A miner with an empty memory bank of ``num_docs`` x ``dim``; not started."""
        return cls(cfg, MemoryBank(num_docs, dim), registry, seed, before_search=before_search, content=content)

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def lookahead(self) -> int:
        """How many batches ahead the trainer keeps submitted: older results would pass the ttl."""
        return min(self.cfg.ttl, self.cfg.fifo_max)

    def active(self, epoch: int) -> bool:
        """Whether steps of this epoch train on mined negatives."""
        return self.cfg.enabled and epoch >= self.cfg.start_epoch

    def start(self) -> None:
        """Start the miner thread; it builds the index from the bank first. Call once."""
        if not self.cfg.enabled or self._started:
            return
        self._started = True
        self.miner.start()
        self.miner.request_refresh()

    def stop(self, timeout: float) -> bool:
        """Stop and join the miner thread within ``timeout`` seconds; True when it has ended."""
        self._fifo.clear()
        return self.miner.stop(timeout)

    # -- every step -----------------------------------------------------------------------

    def observe_docs(self, doc_ids: Any, doc_vecs: Any) -> None:
        """Write this step's positive-document embeddings ([B], [B, E]; detached) into the bank."""
        self.bank.update(doc_ids, doc_vecs)

    def observe_queries(self, item_ids: Any, query_vecs: Any) -> None:
        """Keep this step's query embeddings ([B], [B, E]; detached) for :meth:`submit_ids`."""
        if self.query_bank is None:
            self.query_bank = MemoryBank(self.bank.num_docs, self.bank.dim)
        self.query_bank.update(item_ids, query_vecs)

    def upcoming(self, step: int) -> range:
        """Keys to submit now when batch keys are global steps: up to ``lookahead`` ahead, once each."""
        first = step + 1 if self._last_key is None else max(step + 1, self._last_key + 1)
        return range(first, step + self.lookahead + 1)

    def submit_ids(self, step: int, batch_idx: int, item_ids: Any, positive_ids: Any = None) -> bool:
        """:meth:`submit` with the items' last observed query embeddings (no extra forward pass).

        The queries were encoded when the items were last trained (an epoch ago), so the
        candidates, the window and the ranking come from slightly older query vectors (the
        ones an epoch of training left, not a fresh forward pass). ``positive_ids``
        defaults to ``item_ids`` (item i's positive is document i). False when an item has
        no query embedding yet, or when :meth:`submit` refuses.
        """
        ids = as_numpy_ids(item_ids)
        if self.query_bank is None or not self.query_bank.has(ids):
            return False
        positives = ids if positive_ids is None else positive_ids
        return self.submit(step, batch_idx, self.query_bank.gather(ids), positives)

    def submit(self, step: int, batch_idx: int, query_vecs: Any, positive_ids: Any) -> bool:
        """Queue an upcoming batch for mining; False when it was not queued (never blocks).

        ``batch_idx`` must grow in training order (the global step the batch will be
        trained at is the natural key); ``query_vecs`` [B, E] unit vectors; ``positive_ids``
        [B] or [B, P] document ids, compared again when the batch is trained.
        """
        self._step = max(self._step, step)
        if not self._started or self.n_hard == 0 or not self.miner.alive:
            return False
        if self._last_key is not None and batch_idx <= self._last_key:
            self._reject("batch keys must grow in training order", batch_idx=batch_idx)
            return False
        if len(self._fifo) >= self.cfg.fifo_max:
            self._reject(
                "mining FIFO full (mining.fifo_max); submit fewer batches ahead",
                batch_idx=batch_idx,
            )
            return False
        queries = as_numpy_f32(query_vecs)
        positives = as_numpy_ids(positive_ids).reshape(len(queries), -1)
        self._fifo.append(_Entry(batch_idx, positives, self.miner.submit(batch_idx, queries, positives)))
        self._last_key = batch_idx
        return True

    def negatives(
        self, step: int, batch_idx: int, query_vecs: Any, positive_ids: Any
    ) -> tuple[torch.Tensor, str]:
        """Negatives [B, num_negatives, E] (float32, on query_vecs' device) and their source."""
        neg = self.mine(step, batch_idx, query_vecs, positive_ids)
        return neg.vecs, neg.source

    def mine(self, step: int, batch_idx: int, query_vecs: Any, positive_ids: Any) -> Negatives:
        """:meth:`negatives` with the ids, the mined mask and the age; counts the step's source."""
        self._step = max(self._step, step)
        self._maybe_refresh(step)
        positives = as_numpy_ids(positive_ids)
        positives = positives.reshape(len(positives), -1)
        # Only the row count of the step's queries is used: the window was checked when mined.
        task = self._aligned_result(step, batch_idx, len(query_vecs), positives)
        if self._last_key is None or batch_idx > self._last_key:
            self._last_key = batch_idx

        if task is None:
            source, age = "fallback", None
            ids = self.bank.sample(self._rng, positives, self.cfg.num_negatives)
            mined = np.zeros(ids.shape, dtype=bool)
            vecs_np = self.bank.gather(ids)
        else:
            prep = task.prepared
            assert isinstance(prep, _Prepared)
            ids, mined, vecs_np = prep.ids, prep.mined, prep.vecs
            age = step - task.mined_step
            source = "fresh" if task.call_id > self._last_call else "reused"
            self._last_call = task.call_id
            self._age_sum += age
        self._counts[source] += 1
        self.metrics.batches.labels(source=source).inc()
        vecs = torch.from_numpy(vecs_np)
        if isinstance(query_vecs, torch.Tensor) and query_vecs.device.type != "cpu":
            vecs = vecs.to(query_vecs.device, non_blocking=True)
        return Negatives(vecs=vecs, ids=ids, mined=mined, source=source, age=age)

    # -- internals --------------------------------------------------------------------------

    def _aligned_result(
        self, step: int, batch_idx: int, num_queries: int, positives: IdArray
    ) -> MineTask | None:
        """The mined result of exactly this batch, if it is ready, fits and is within ttl."""
        entry = None
        while self._fifo and self._fifo[0].batch_idx <= batch_idx:
            head = self._fifo.popleft()
            if head.batch_idx == batch_idx:
                entry = head
            else:
                head.task.cancelled = True  # a batch that was never trained
        found = None
        while (task := self.miner.try_get(until=batch_idx)) is not None:
            if entry is not None and task is entry.task:
                found = task
        if entry is None:
            return None
        if found is None:
            entry.task.cancelled = True  # too late for this batch: the miner may skip it
            return None
        if entry.positive_ids.shape != positives.shape or num_queries != len(positives):
            self._mismatch(batch_idx, entry.positive_ids.shape, positives.shape)
            return None
        if not np.array_equal(entry.positive_ids, positives):
            self._mismatch(batch_idx, "other positive ids", "these")
            return None
        if step - found.mined_step > self.cfg.ttl:
            self._stale += 1
            return None
        return found

    def _prepare(self, task: MineTask) -> None:
        """In the miner thread: the batch's negatives, ready to use (the trainer only reads them).

        The best ``n_hard`` candidates by cosine against the queries the batch was
        submitted with, inside the window, none of them a positive, with the bank rows
        the window was checked on (a row may move before the step: these stay); the
        other slots, and those the window emptied, are random bank rows. All of it here
        because on the training thread these reads of cold memory cost ~2 ms a step.
        """
        assert task.ids is not None and task.positives is not None
        positives, num, n_hard = task.positives, self.cfg.num_negatives, self.n_hard
        cand = task.ids
        rows = self.bank.gather(np.maximum(cand, 0), chunk=_GATHER_CHUNK)
        cand = np.where((cand[:, :, None] == positives[:, None, :]).any(axis=2), -1, cand)
        cand = self._drop_false_negatives(cand, rows, positives, task.queries)
        hard, ok, hard_rows = self._select_hard(cand, rows, task.queries)
        ids = self.bank.sample(self._miner_rng, positives, num)
        ids[:, :n_hard][ok] = hard[ok]
        mined = np.zeros(ids.shape, dtype=bool)
        mined[:, :n_hard] = ok
        vecs = np.empty((*ids.shape, self.bank.dim), dtype=np.float32)
        vecs[:, :n_hard] = hard_rows
        vecs[:, n_hard:] = self.bank.gather(ids[:, n_hard:])
        if not ok.all():
            vecs[:, :n_hard][~ok] = self.bank.gather(ids[:, :n_hard][~ok])
        task.prepared = _Prepared(ids, mined, vecs)

    def _drop_false_negatives(self, cand: IdArray, rows: np.ndarray, positives: IdArray,
                              queries: np.ndarray) -> IdArray:
        """``cand`` with the likely false negatives set to -1: a candidate holding a positive's
        very content (a duplicate under another id), and one the query scores above
        ``mining.max_pos_ratio`` times its best positive. Near-duplicates of the positive come
        back from FAISS as the "hardest" negatives; training to push them away teaches the
        towers that the right answer is wrong. The ratio applies where the positive scores
        above zero (early in training a ratio of a negative score would drop everything)."""
        live = cand >= 0
        if self.content is not None:
            same = (self.content[np.maximum(cand, 0)][:, :, None] == self.content[positives][:, None, :]).any(axis=2)
            same &= live
            if same.any():
                n = int(same.sum())
                self._filtered["duplicate"] += n
                self.metrics.filtered.labels(reason="duplicate").inc(n)
                cand = np.where(same, -1, cand)
                live &= ~same
        ratio = self.cfg.max_pos_ratio
        if ratio > 0:
            pos = np.einsum("bpe,be->bp", self.bank.gather(positives), queries).max(axis=1)  # [B]
            cos = np.matmul(rows, queries[:, :, None])[:, :, 0]
            over = live & (pos[:, None] > 0) & (cos > ratio * pos[:, None])
            if over.any():
                n = int(over.sum())
                self._filtered["ratio"] += n
                self.metrics.filtered.labels(reason="ratio").inc(n)
                cand = np.where(over, -1, cand)
        return cand

    def _select_hard(
        self, cand: IdArray, cand_vecs: np.ndarray, queries: np.ndarray
    ) -> tuple[IdArray, BoolArray, np.ndarray]:
        """Up to n_hard candidates per query: the most similar to ``queries``, inside the window.

        ``cand`` [B, k] (-1: none, or excluded), ``cand_vecs`` their rows [B, k, E].
        Returns ids [B, n_hard], a mask of the usable ones, and their rows [B, n_hard, E].
        """
        n = self.n_hard
        cos = np.matmul(cand_vecs, queries[:, :, None])[:, :, 0]
        valid = (cand >= 0) & (cos >= self.cfg.cos_min) & (cos <= self.cfg.cos_max)
        order = np.argsort(np.where(valid, -cos, np.inf), axis=1, kind="stable")[:, :n]
        hard = np.take_along_axis(cand, order, axis=1)
        ok = np.take_along_axis(valid, order, axis=1)
        rows = cand_vecs[np.arange(len(cand))[:, None], order]  # 15x faster than take_along_axis here
        if hard.shape[1] < n:  # an index smaller than n_hard
            pad = n - hard.shape[1]
            hard = np.pad(hard, ((0, 0), (0, pad)), constant_values=-1)
            ok = np.pad(ok, ((0, 0), (0, pad)), constant_values=False)
            rows = np.pad(rows, ((0, 0), (0, pad), (0, 0)))
        return hard, ok, rows

    def _maybe_refresh(self, step: int) -> None:
        if self._refresh_from is None:
            self._refresh_from = step  # start() requested the first build
        elif step - self._refresh_from >= self.cfg.refresh_steps:
            self._refresh_from = step
            self.miner.request_refresh()

    def _mismatch(self, batch_idx: int, mined_for: Any, got: Any) -> None:
        self._mismatches += 1
        self._log_once(
            "mismatch",
            "mined negatives do not fit this batch; skipping them for this step (memory-bank fallback)",
            batch_idx=batch_idx,
            mined_for=str(mined_for),
            got=str(got),
        )

    def _reject(self, why: str, **fields: Any) -> None:
        self._rejected += 1
        self._log_once(why, why, **fields)

    def _log_once(self, key: str, event: str, **fields: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(event, **fields)

    # -- health -------------------------------------------------------------------------------

    def queue_depths(self) -> QueueDepths:
        """in_q: submitted, not yet searched; out_q: mined, not yet used; fifo: submitted, not trained."""
        return QueueDepths(self.miner.pending_count, self.miner.ready_count, len(self._fifo))

    def queue_health_line(self, step: int) -> str:
        """The queue-health line operators grep for; warns what to raise when out_q was 0 at consecutive checks."""
        d = self.queue_depths()
        self._zero_out_q = self._zero_out_q + 1 if d.out_q == 0 else 0
        if self._zero_out_q >= _ZERO_OUT_Q_CHECKS:
            log.warning(
                "Queue Health: out_q=0 - mining is the bottleneck; increase mining.prefetch "
                "or mining.qbatch (or mining.ttl)",
                step=step,
                checks_in_a_row=self._zero_out_q,
                alive=self.miner.alive,
            )
        return f"[Queue Health @ step {step}] in_q={d.in_q}, out_q={d.out_q}, fifo={d.fifo}"

    def status(self) -> dict[str, Any]:
        """The mining section of /status (JSON-serialisable)."""
        d = self.queue_depths()
        used = self._counts["fresh"] + self._counts["reused"]
        total = used + self._counts["fallback"]
        return {
            "enabled": self.cfg.enabled,
            "started": self._started,
            **self.miner.status(),
            "in_q": d.in_q,
            "out_q": d.out_q,
            "fifo": d.fifo,
            "batches": dict(self._counts),
            "freshness": round(used / total, 4) if total else None,
            "mean_age_steps": round(self._age_sum / used, 3) if used else None,
            "stale": self._stale,
            "mismatches": self._mismatches,
            "rejected_submits": self._rejected,
            "filtered": dict(self._filtered),
            "bank_docs": self.bank.filled_count,
            "lookahead": self.lookahead,
        }
