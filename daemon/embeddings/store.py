"""The tiered trainable embedding store (issue 5, seed 002).

One row of ``embedding_dim`` float32 values per sample, rows ``0..num_rows-1``.

``memory`` mode keeps the table in one tensor. ``disk`` mode keeps it in chunk
files of ``chunk_size`` rows under ``embeddings_dir`` and holds at most
``cache_l1_size_mb + cache_l2_size_mb`` of them in memory, in one pool of
chunk-sized slots managed as a segmented LRU:

- a chunk read from disk (L3) enters L2, the probationary segment;
- a chunk found in L2 is promoted to L1, the protected segment;
- when L1 is over its size, its least recently used chunks are demoted to L2;
- when a slot is needed, the least recently used L2 chunk is evicted (L1's
  only when L2 is empty), written back first when dirty.

An epoch sweep over a table larger than memory thus flows through L2 and
leaves the hot set in L1. Tiers are labels on slots of one array, so promotion
and demotion copy nothing and a lookup is one vectorised gather; the per-call
work in Python is per chunk touched, never per id (NOTES-mining.md: per-id
caches are slower than a page-cached memmap).

Memory bound, whatever the access pattern: the pool (L1 + L2 rounded down to
whole chunks, at least one chunk) + 16 bytes per chunk of index (+ 8 per chunk
per pinned checkpoint); while a call runs, temporaries of about 128 bytes + 3
rows per requested id (the returned tensor included).
Chunk files are read straight into their slot and written from it.

Persistence: every sync writes the dirty chunks as new files named by the
pending *generation* (temp file, fsync, rename), fsyncs the directory, then
commits ``manifest-g<gen>.json`` naming the file of every chunk. Reopening
reads the newest manifest, so it restores exactly the last sync, and a kill -9
at any moment leaves every chunk file whole. A dirty chunk evicted between
syncs is written under the pending generation too; the next commit includes
it and a crash before that discards it. :meth:`EmbeddingStore.checkpoint_state`
syncs and *pins* the generation (the last ``keep_checkpoints`` are kept), so a
trainer that resumes from a checkpoint reopens the store at that generation.
Chunks never written hold their initial values, generated per chunk from
``seed`` (normal with std ``init_std``, or zeros); memory mode generates the
same table.

Updates with duplicate ids: the last occurrence wins. Reads with duplicates
return the row once per occurrence. Thread-safe (one lock).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import structlog
import torch

from daemon import atomic
from daemon.embeddings import chunkfile
from daemon.embeddings.chunkfile import EmbeddingStoreCorrupt

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = structlog.get_logger(__name__)

_MB = 1024 * 1024
_NOT_RESIDENT = 3  # tier label of the sentinel slot that slot -1 indexes
_PROTECT = np.int64(1) << 62


class EmbeddingsSettings(Protocol):
    """The fields of ``daemon.config.EmbeddingsConfig`` this store reads."""

    storage_mode: Literal["memory", "disk"]
    dir: str
    chunk_size: int
    cache_l1_mb: float
    cache_l2_mb: float
    enable_l3: bool
    sync_batch_size: int
    auto_sync: bool


def _as_numpy(values: Any, dtype: type) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


class EmbeddingStore:
    """Per-row trainable embeddings in memory or in chunk files with L1/L2 memory tiers."""

    def __init__(
        self,
        num_rows: int | None = None,
        embedding_dim: int = 128,
        storage_mode: Literal["memory", "disk"] = "memory",
        embeddings_dir: str | os.PathLike[str] | None = None,
        chunk_size: int = 1024,
        cache_l1_size_mb: float = 256,
        cache_l2_size_mb: float = 512,
        enable_l3_cache: bool = True,
        sync_batch_size: int = 10,
        auto_sync: bool = True,
        *,
        sample_ids: Any = None,
        init: Literal["normal", "zeros"] = "normal",
        init_std: float = 0.01,
        seed: int = 0,
        generation: int | None = None,
        keep_checkpoints: int = 3,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._id_sorted: np.ndarray | None = None
        self._id_rows: np.ndarray | None = None
        self._ids_digest = ""
        if sample_ids is not None:
            ids = _as_numpy(sample_ids, np.int64).reshape(-1)
            if num_rows is not None and num_rows != len(ids):
                raise ValueError(f"num_rows ({num_rows}) != len(sample_ids) ({len(ids)})")
            num_rows = len(ids)
            if not np.array_equal(ids, np.arange(len(ids))):
                order = np.argsort(ids, kind="stable")
                self._id_sorted = ids[order]
                if len(ids) > 1 and (self._id_sorted[1:] == self._id_sorted[:-1]).any():
                    raise ValueError("sample_ids contains duplicates")
                self._id_rows = order
                self._ids_digest = hashlib.blake2b(ids.tobytes(), digest_size=16).hexdigest()
        if num_rows is None or num_rows <= 0:
            raise ValueError(f"num_rows must be > 0 (got {num_rows})")
        if embedding_dim <= 0 or chunk_size <= 0 or sync_batch_size <= 0 or keep_checkpoints <= 0:
            raise ValueError("embedding_dim, chunk_size, sync_batch_size and keep_checkpoints must be > 0")
        if storage_mode not in ("memory", "disk"):
            raise ValueError(f"storage_mode must be 'memory' or 'disk' (got {storage_mode!r})")
        if init not in ("normal", "zeros"):
            raise ValueError(f"init must be 'normal' or 'zeros' (got {init!r})")

        self.num_rows = int(num_rows)
        self.embedding_dim = int(embedding_dim)
        self.storage_mode = storage_mode
        self.chunk_size = int(chunk_size)
        self.sync_batch_size = int(sync_batch_size)
        self.auto_sync = bool(auto_sync)
        self.enable_l3_cache = bool(enable_l3_cache)
        self.keep_checkpoints = int(keep_checkpoints)
        self._init = init
        self._init_std = float(init_std)
        self._seed = int(seed)
        self.num_chunks = -(-self.num_rows // self.chunk_size)
        self._chunk_bytes = self.chunk_size * self.embedding_dim * 4
        self._lock = threading.RLock()
        self._closed = False
        self._updates_since_sync = 0
        self._tick = 0
        self._stats = dict.fromkeys(
            (
                "lookups", "l1_hits", "l2_hits", "l3_hits", "l3_misses", "disk_syncs",
                "chunk_writes", "chunk_reads", "evictions", "writebacks", "promotions",
            ),
            0,
        )  # fmt: skip
        self._table: torch.Tensor | None = None
        self.dir: Path | None = None
        self.generation = -1
        self._pending = 0
        self._file_gen = np.full(self.num_chunks, -1, np.int64)
        self._superseded: list[tuple[int, int]] = []
        self._uncommitted = False
        self._pins: dict[int, np.ndarray] = {}
        self._n_slots = 0

        if storage_mode == "memory":
            table = np.empty((self.num_rows, self.embedding_dim), np.float32)
            for c in range(self.num_chunks):
                lo, hi = self._chunk_range(c)
                self._init_chunk(c, table[lo:hi])
            self._table = torch.from_numpy(table)
            self.generation = 0
        else:
            if embeddings_dir is None:
                raise ValueError("storage_mode='disk' needs embeddings_dir")
            self.dir = Path(embeddings_dir)
            self._setup_pool(cache_l1_size_mb, cache_l2_size_mb)
            self._open_dir(generation)
            if not self.enable_l3_cache:
                self._preload_all()

        self._collector = None
        self._registry = registry
        if registry is not None:
            from daemon.embeddings.metrics import EmbeddingCacheCollector

            self._collector = EmbeddingCacheCollector(self)
            registry.register(self._collector)
        log.info(
            "embedding store opened",
            storage_mode=storage_mode,
            num_rows=self.num_rows,
            dim=self.embedding_dim,
            dir=str(self.dir) if self.dir else None,
            generation=self.generation,
            memory_bound_bytes=self.memory_bound_bytes(),
        )

    @classmethod
    def from_config(
        cls,
        cfg: EmbeddingsSettings,
        num_rows: int,
        dim: int,
        state_dir: Path,
        registry: CollectorRegistry | None,
        *,
        generation: int | None = None,
        seed: int = 0,
        keep_checkpoints: int = 3,
    ) -> EmbeddingStore:
        """Build from the ``embeddings`` config section; ``dir`` empty means ``<state_dir>/embeddings``."""
        return cls(
            num_rows=num_rows,
            embedding_dim=dim,
            storage_mode=cfg.storage_mode,
            embeddings_dir=Path(cfg.dir) if cfg.dir else Path(state_dir) / "embeddings",
            chunk_size=cfg.chunk_size,
            cache_l1_size_mb=cfg.cache_l1_mb,
            cache_l2_size_mb=cfg.cache_l2_mb,
            enable_l3_cache=cfg.enable_l3,
            sync_batch_size=cfg.sync_batch_size,
            auto_sync=cfg.auto_sync,
            seed=seed,
            generation=generation,
            keep_checkpoints=keep_checkpoints,
            registry=registry,
        )

    # ------------------------------------------------------------------ public API

    def get_embeddings(self, ids: Any, requires_grad: bool = False) -> torch.Tensor:
        """Rows for ``ids`` (int64 numpy array or tensor, duplicates allowed) as a new
        float32 CPU tensor ``[len(ids), dim]``; a leaf with ``requires_grad`` when asked."""
        with self._lock:
            self._check_open()
            idx = self._rows(ids)
            if self._table is not None:
                out_t = self._table.index_select(0, torch.from_numpy(idx))
                self._stats["lookups"] += len(idx)
                self._stats["l1_hits"] += len(idx)
            else:
                out_t = torch.from_numpy(self._gather(idx))
        if requires_grad:
            out_t.requires_grad_(True)
        return out_t

    def update_embeddings(self, ids: Any, values: Any) -> None:
        """Overwrite rows ``ids`` with ``values`` ``[len(ids), dim]``; for a repeated id
        the last occurrence wins. Counts one update operation towards auto sync."""
        with self._lock:
            self._check_open()
            idx = self._rows(ids)
            vals = _as_numpy(values, np.float32)
            if vals.shape != (len(idx), self.embedding_dim):
                raise ValueError(f"values must have shape ({len(idx)}, {self.embedding_dim}), got {tuple(vals.shape)}")
            if len(idx) > 1:
                order = np.argsort(idx, kind="stable")
                s = idx[order]
                last = np.ones(len(idx), bool)
                last[:-1] = s[1:] != s[:-1]
                if not last.all():
                    keep = order[last]
                    idx, vals = idx[keep], vals[keep]
            if self._table is not None:
                self._table[torch.from_numpy(idx)] = torch.from_numpy(np.ascontiguousarray(vals))
            else:
                self._scatter(idx, vals)
            self._updates_since_sync += 1
            if self.auto_sync and self._updates_since_sync >= self.sync_batch_size:
                self._sync()

    def enable_auto_sync(self, flag: bool) -> None:
        """With auto sync off, dirty chunks reach disk only on sync, eviction, checkpoint or close."""
        with self._lock:
            self.auto_sync = bool(flag)

    def force_sync_all_chunks(self) -> int:
        """Write every dirty chunk and commit a generation; returns the committed generation."""
        with self._lock:
            self._check_open()
            self._sync()
            return self.generation

    def checkpoint_state(self) -> dict[str, Any]:
        """Sync and return what a checkpoint must save to restore this exact table.

        disk: ``{"storage_mode": "disk", "generation": g, "dir": ...}``; the chunk files
        are the persistent state and generation ``g`` is pinned (the last
        ``keep_checkpoints`` pins are kept). Restore by reopening with ``generation=g``.
        memory: ``{"storage_mode": "memory", "table": <tensor copy>}``; restore with
        :meth:`load_checkpoint_state`.
        """
        with self._lock:
            self._check_open()
            if self._table is not None:
                return {"storage_mode": "memory", "table": self._table.clone()}
            self._sync()
            self._pin(self.generation)
            return {"storage_mode": "disk", "generation": self.generation, "dir": str(self.dir)}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Memory mode: put back a table from :meth:`checkpoint_state`. Disk mode:
        reopen at the state's generation (same as constructing with ``generation=``)."""
        with self._lock:
            self._check_open()
            if self._table is not None:
                table = state["table"]
                if tuple(table.shape) != (self.num_rows, self.embedding_dim):
                    raise ValueError(f"checkpoint table has shape {tuple(table.shape)}")
                self._table.copy_(table)
                return
            self._dirty[:] = False
            self._slot_of_chunk[:] = -1
            self._chunk_of_slot[:] = -1
            self._tier[: self._n_slots] = 0
            self._updates_since_sync = 0
            self._open_dir(int(state["generation"]))
            if not self.enable_l3_cache:
                self._preload_all()

    def close(self) -> None:
        """Sync and release; idempotent."""
        with self._lock:
            if self._closed:
                return
            if self._table is None:
                self._sync()
            self._closed = True
            if self._collector is not None and self._registry is not None:
                self._registry.unregister(self._collector)
                self._collector = None
            log.info("embedding store closed", generation=self.generation, **self._stats)

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_cache_performance(self) -> dict[str, Any]:
        """Counters of the seed's API plus per-tier bytes; ``cache_hit_rate`` = L1+L2 hits / lookups."""
        with self._lock:
            s: dict[str, Any] = dict(self._stats)
            lookups = s["lookups"]
            tier_bytes = self.tier_bytes()
            s.update(
                total_requests=lookups,
                cache_hit_rate=(s["l1_hits"] + s["l2_hits"]) / lookups if lookups else 0.0,
                l1_hit_rate=s["l1_hits"] / lookups if lookups else 0.0,
                l2_hit_rate=s["l2_hits"] / lookups if lookups else 0.0,
                l1_bytes=tier_bytes["l1"],
                l2_bytes=tier_bytes["l2"],
                l3_bytes=tier_bytes["l3"],
                memory_usage_mb=(tier_bytes["l1"] + tier_bytes["l2"]) / _MB,
                memory_bound_bytes=self.memory_bound_bytes(),
                dirty_chunks=0 if self._table is not None else int(self._dirty.sum()),
                generation=self.generation,
                auto_sync=self.auto_sync,
            )
            return s

    def status(self) -> dict[str, Any]:
        """This component's section of ``/status`` (JSON-serialisable)."""
        perf = self.get_cache_performance()
        return {
            "storage_mode": self.storage_mode,
            "num_rows": self.num_rows,
            "dim": self.embedding_dim,
            "chunk_size": self.chunk_size,
            "dir": str(self.dir) if self.dir else None,
            "closed": self._closed,
            **{k: perf[k] for k in (
                "generation", "cache_hit_rate", "total_requests", "l1_hits", "l2_hits", "l3_hits",
                "l3_misses", "l1_bytes", "l2_bytes", "l3_bytes", "memory_bound_bytes", "dirty_chunks",
                "disk_syncs", "chunk_writes", "chunk_reads", "evictions", "auto_sync",
            )},
        }  # fmt: skip

    def cache_log_line(self) -> str:
        """The line the trainer logs every few epochs."""
        p = self.get_cache_performance()
        return (
            f"Embedding cache: hit rate {p['cache_hit_rate']:.1%} "
            f"(L1 {p['l1_hit_rate']:.1%}, L2 {p['l2_hit_rate']:.1%}) over {p['total_requests']} lookups"
            f" | L1 {p['l1_bytes'] / _MB:.1f} MB, L2 {p['l2_bytes'] / _MB:.1f} MB"
            f" | disk syncs {p['disk_syncs']}, chunk reads {p['chunk_reads']}, writes {p['chunk_writes']}"
        )

    def tier_bytes(self) -> dict[str, int]:
        """Bytes held per tier: l1/l2 in memory, l3 in chunk files of the current state."""
        with self._lock:
            if self._table is not None:
                return {"l1": self._table.numel() * 4, "l2": 0, "l3": 0}
            tiers = self._tier[: self._n_slots]
            on_disk = int((self._file_gen >= 0).sum())
            return {
                "l1": int((tiers == 1).sum()) * self._chunk_bytes,
                "l2": int((tiers == 2).sum()) * self._chunk_bytes,
                "l3": on_disk * self._chunk_bytes,
            }

    def memory_bound_bytes(self) -> int:
        """Most bytes this store holds between calls (see the module docstring)."""
        if self._table is not None:
            return self._table.numel() * 4
        index = self.num_chunks * (16 + 8 * self.keep_checkpoints) + (self._n_slots + 1) * 26
        return int(self._pool.nbytes) + index

    def row_index(self, ids: Any) -> np.ndarray:
        """Row numbers (0..num_rows-1) of ``ids``; the identity unless built with ``sample_ids``."""
        return self._rows(ids)

    # ------------------------------------------------------------------ ids and init

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("embedding store is closed")

    def _rows(self, ids: Any) -> np.ndarray:
        idx = _as_numpy(ids, np.int64).reshape(-1)
        if self._id_sorted is not None and self._id_rows is not None:
            pos = np.searchsorted(self._id_sorted, idx)
            np.minimum(pos, len(self._id_sorted) - 1, out=pos)
            bad = self._id_sorted[pos] != idx
            if bad.any():
                raise KeyError(f"unknown sample id {int(idx[bad][0])}")
            return self._id_rows[pos]
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.num_rows):
            raise IndexError(f"row id out of range [0, {self.num_rows}): min {idx.min()}, max {idx.max()}")
        return idx

    def _chunk_range(self, c: int) -> tuple[int, int]:
        lo = c * self.chunk_size
        return lo, min(lo + self.chunk_size, self.num_rows)

    def _init_chunk(self, c: int, out: np.ndarray) -> None:
        if self._init == "zeros":
            out.fill(0.0)
        else:
            rng = np.random.default_rng([self._seed, c])
            rng.standard_normal(out.shape, dtype=np.float32, out=out)
            out *= np.float32(self._init_std)

    # ------------------------------------------------------------------ disk: pool and tiers

    def _setup_pool(self, l1_mb: float, l2_mb: float) -> None:
        n1 = int(l1_mb * _MB) // self._chunk_bytes
        n2 = int(l2_mb * _MB) // self._chunk_bytes
        total = max(1, n1 + n2)  # one staging slot when the tiers are smaller than a chunk
        self._n_slots = min(total, self.num_chunks)
        self._n_l1 = min(n1, self._n_slots)
        self._pool = np.empty((self._n_slots, self.chunk_size, self.embedding_dim), np.float32)
        self._pool2d = self._pool.reshape(-1, self.embedding_dim)
        # Per-slot arrays have one extra entry: slot -1 (not resident) indexes it.
        self._tier = np.zeros(self._n_slots + 1, np.int8)  # 0 free, 1 L1, 2 L2
        self._tier[-1] = _NOT_RESIDENT
        self._stamp = np.zeros(self._n_slots + 1, np.int64)
        self._dirty = np.zeros(self._n_slots + 1, bool)
        self._chunk_of_slot = np.full(self._n_slots + 1, -1, np.int64)
        self._slot_of_chunk = np.full(self.num_chunks, -1, np.int64)

    def _preload_all(self) -> None:
        if self.num_chunks > self._n_slots:
            raise ValueError(
                f"embeddings.enable_l3=false needs the whole table in L1+L2: {self.num_chunks} chunks "
                f"of {self._chunk_bytes} bytes, room for {self._n_slots}"
            )
        self._tick += 1
        self._load(np.arange(self.num_chunks))

    def _resident(self, chunk: np.ndarray, count: bool) -> Iterator[tuple[np.ndarray | None, np.ndarray]]:
        """Make the chunks of ``chunk`` resident and yield ``(positions, slots)``; positions
        None means all. More distinct chunks than slots are served in groups."""
        self._tick += 1
        slots = self._slot_of_chunk[chunk]
        tiers = self._tier[slots]
        if len(tiers) and tiers.max() == 1:  # the common case: all in L1; nothing moves
            self._stamp[slots] = self._tick
            if count:
                self._stats["lookups"] += len(chunk)
                self._stats["l1_hits"] += len(chunk)
            yield None, slots
            return
        if count:
            n = np.bincount(tiers, minlength=4)
            st = self._stats
            st["lookups"] += len(chunk)
            st["l1_hits"] += int(n[1])
            st["l2_hits"] += int(n[2])
            if n[3]:
                on_disk = int((self._file_gen[chunk[tiers == _NOT_RESIDENT]] >= 0).sum())
                st["l3_hits"] += on_disk
                st["l3_misses"] += int(n[3]) - on_disk
        promoted = False
        if (tiers == 2).any():
            self._promote(np.unique(slots[tiers == 2]))
            promoted = True
        if (slots >= 0).all():
            self._stamp[slots] = self._tick
            if promoted:
                self._rebalance()
            yield None, slots
            return
        uniq = np.unique(chunk)
        if len(uniq) <= self._n_slots:
            self._load(uniq)
            self._rebalance()
            yield None, self._slot_of_chunk[chunk]
            return
        order = np.argsort(chunk, kind="stable")
        sorted_chunks = chunk[order]
        bounds = np.searchsorted(sorted_chunks, uniq[:: self._n_slots])
        bounds = np.append(bounds, len(chunk))
        for g in range(len(bounds) - 1):
            self._tick += 1
            pos = order[bounds[g] : bounds[g + 1]]
            self._load(np.unique(sorted_chunks[bounds[g] : bounds[g + 1]]))
            yield pos, self._slot_of_chunk[chunk[pos]]
        self._rebalance()

    def _promote(self, slots: np.ndarray) -> None:
        self._tier[slots] = 1
        self._stats["promotions"] += len(slots)

    def _rebalance(self) -> None:
        """Demote the least recently used L1 chunks to L2 while L1 is over its size."""
        l1 = np.flatnonzero(self._tier[: self._n_slots] == 1)
        extra = len(l1) - self._n_l1
        if extra > 0:
            oldest = l1[np.argpartition(self._stamp[l1], extra - 1)[:extra]]
            self._tier[oldest] = 2

    def _load(self, chunks: np.ndarray) -> None:
        """Make ``chunks`` (distinct, at most n_slots) resident; new ones enter L2."""
        slots = self._slot_of_chunk[chunks]
        self._stamp[slots[slots >= 0]] = self._tick  # protect them from eviction below
        missing = chunks[slots < 0]
        if not len(missing):
            return
        victims = self._pick_victims(len(missing))
        self._evict(victims)
        for c, s in zip(missing.tolist(), victims.tolist(), strict=True):
            lo, hi = self._chunk_range(c)
            rows = self._pool[s, : hi - lo]
            g = int(self._file_gen[c])
            if g >= 0:  # may raise EmbeddingStoreCorrupt: the slot then stays free
                chunkfile.read_chunk_into(self._chunk_path(c, g), c, g, rows)
                self._stats["chunk_reads"] += 1
            else:
                self._init_chunk(c, rows)
            self._slot_of_chunk[c] = s
            self._chunk_of_slot[s] = c
            self._tier[s] = 2
            self._stamp[s] = self._tick
            self._dirty[s] = False

    def _pick_victims(self, k: int) -> np.ndarray:
        n = self._n_slots
        tier = self._tier[:n]
        key = self._stamp[:n].copy()
        key[tier == 1] += np.int64(1) << 40  # L2 goes first
        key[self._stamp[:n] == self._tick] = _PROTECT
        key[tier == 0] = -1
        victims = np.argpartition(key, k - 1)[:k] if k < n else np.arange(n)
        if (key[victims] == _PROTECT).any():  # cannot happen: callers pass at most n_slots chunks
            raise RuntimeError("embedding cache: no slot free to evict")
        return victims

    def _evict(self, slots: np.ndarray) -> None:
        slots = slots[self._tier[slots] != 0]
        if not len(slots):
            return
        dirty = slots[self._dirty[slots]]
        if len(dirty):
            self._write_slots(dirty)
            self._stats["writebacks"] += 1
            self._stats["disk_syncs"] += 1
        chunks = self._chunk_of_slot[slots]
        self._slot_of_chunk[chunks] = -1
        self._chunk_of_slot[slots] = -1
        self._tier[slots] = 0
        self._stats["evictions"] += len(slots)

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        chunk, off = np.divmod(idx, self.chunk_size)
        out: np.ndarray | None = None
        for pos, slots in self._resident(chunk, count=True):
            flat = slots * self.chunk_size
            if pos is None:
                flat += off
                # not take(out=...): with mode="raise" numpy then gathers into a temp and copies
                return np.take(self._pool2d, flat, axis=0)
            if out is None:
                out = np.empty((len(idx), self.embedding_dim), np.float32)
            out[pos] = self._pool2d[flat + off[pos]]
        assert out is not None
        return out

    def _scatter(self, idx: np.ndarray, vals: np.ndarray) -> None:
        chunk, off = np.divmod(idx, self.chunk_size)
        for pos, slots in self._resident(chunk, count=False):
            if pos is None:
                self._pool2d[slots * self.chunk_size + off] = vals
            else:
                self._pool2d[slots * self.chunk_size + off[pos]] = vals[pos]
            self._dirty[slots] = True

    # ------------------------------------------------------------------ disk: files and generations

    def _chunk_path(self, c: int, g: int) -> Path:
        assert self.dir is not None
        return self.dir / chunkfile.chunk_name(c, g)

    def _write_slots(self, slots: np.ndarray) -> None:
        """Write these dirty slots under the pending generation (not yet committed)."""
        p = self._pending
        for s in slots.tolist():
            c = int(self._chunk_of_slot[s])
            lo, hi = self._chunk_range(c)
            chunkfile.write_chunk(self._chunk_path(c, p), c, p, self._pool[s, : hi - lo])
            old = int(self._file_gen[c])
            if old >= 0 and old != p:
                self._superseded.append((c, old))
            self._file_gen[c] = p
            self._dirty[s] = False
            self._stats["chunk_writes"] += 1
        self._uncommitted = True

    def _sync(self) -> None:
        if self._table is not None:
            self._updates_since_sync = 0
            return
        dirty = np.flatnonzero(self._dirty[: self._n_slots])
        if len(dirty):
            self._write_slots(dirty)
            self._stats["disk_syncs"] += 1
        self._updates_since_sync = 0
        if self._uncommitted:
            self._commit()

    def _commit(self) -> None:
        """Make the pending generation the current one: directory fsync, then the manifest."""
        assert self.dir is not None
        atomic.fsync_dir(self.dir)
        p = self._pending
        chunkfile.write_json(self.dir / chunkfile.manifest_name(p), self._manifest(p))
        previous = self.generation
        self.generation = p
        self._pending = p + 1
        self._uncommitted = False
        if previous >= 0 and previous not in self._pins:
            self._unlink(self.dir / chunkfile.manifest_name(previous))
        superseded, self._superseded = self._superseded, []
        for c, g in superseded:
            if not any(pinned[c] == g for pinned in self._pins.values()):
                self._unlink(self._chunk_path(c, g))

    def _manifest(self, g: int) -> dict[str, Any]:
        return {
            "format": chunkfile.FORMAT_VERSION,
            "generation": g,
            "num_rows": self.num_rows,
            "dim": self.embedding_dim,
            "chunk_size": self.chunk_size,
            "init": self._init,
            "init_std": self._init_std,
            "seed": self._seed,
            "sample_ids_digest": self._ids_digest,
            "chunks": self._file_gen.tolist(),
        }

    def _pin(self, g: int) -> None:
        assert self.dir is not None
        if g not in self._pins:
            self._pins[g] = self._file_gen.copy()
        while len(self._pins) > self.keep_checkpoints:
            old = min(self._pins)
            arr = self._pins.pop(old)
            if old != self.generation:
                self._unlink(self.dir / chunkfile.manifest_name(old))
            for c in np.flatnonzero((arr >= 0) & (arr != self._file_gen)).tolist():
                if not any(p[c] == arr[c] for p in self._pins.values()):
                    self._unlink(self._chunk_path(c, int(arr[c])))
        chunkfile.write_json(self.dir / chunkfile.PINS_NAME, {"pinned": sorted(self._pins)})

    @staticmethod
    def _unlink(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def _read_manifest(self, g: int) -> np.ndarray:
        assert self.dir is not None
        path = self.dir / chunkfile.manifest_name(g)
        m = chunkfile.read_json(path)
        want = {"num_rows": self.num_rows, "dim": self.embedding_dim, "chunk_size": self.chunk_size}
        got = {k: m.get(k) for k in want}
        if got != want:
            raise ValueError(f"embedding store {self.dir} was created with {got}, asked for {want}")
        if m.get("sample_ids_digest", "") != self._ids_digest:
            raise ValueError(f"embedding store {self.dir} was created for different sample_ids")
        chunks = m.get("chunks")
        if not isinstance(chunks, list) or len(chunks) != self.num_chunks:
            raise EmbeddingStoreCorrupt(f"embedding store file {path} has a bad chunk list")
        # the manifest's init wins: rows never written must come back as they were
        self._init, self._init_std, self._seed = m["init"], float(m["init_std"]), int(m["seed"])
        return np.asarray(chunks, np.int64)

    def _open_dir(self, generation: int | None) -> None:
        """Open the newest (or the requested, pinned) generation, check its files, and
        remove what no kept manifest names (temp files and uncommitted chunks of a crash)."""
        d = self.dir
        assert d is not None
        d.mkdir(parents=True, exist_ok=True)
        names = os.listdir(d)
        manifests = sorted(int(m.group(1)) for n in names if (m := chunkfile.MANIFEST_RE.match(n)) is not None)
        max_gen = max(
            [*manifests, *(int(m.group(2)) for n in names if (m := chunkfile.CHUNK_RE.match(n)))],
            default=-1,
        )
        self._superseded = []
        self._uncommitted = False
        self._pins = {}
        self._pending = max_gen + 1
        if not manifests:
            if generation is not None:
                raise ValueError(f"embedding store {d} has no generation {generation}: it is empty")
            self._file_gen = np.full(self.num_chunks, -1, np.int64)
            self.generation = -1
            self._commit()
        else:
            target = manifests[-1] if generation is None else generation
            if target not in manifests:
                raise ValueError(f"embedding store {d} has no generation {target} (has {manifests})")
            self._file_gen = self._read_manifest(target)
            self.generation = target
            pins_path = d / chunkfile.PINS_NAME
            if pins_path.exists():
                for g in chunkfile.read_json(pins_path).get("pinned", []):
                    if int(g) in manifests:
                        self._pins[int(g)] = self._file_gen.copy() if g == target else self._read_manifest_quiet(int(g))
            if target != manifests[-1]:
                # Restoring an older generation: commit it again as the newest, so a plain
                # reopen after a crash also comes back to it.
                self._commit()
        for c in np.flatnonzero(self._file_gen >= 0).tolist():
            lo, hi = self._chunk_range(c)
            chunkfile.check_size(self._chunk_path(c, int(self._file_gen[c])), hi - lo, self.embedding_dim)
        keep_manifests = {chunkfile.manifest_name(g) for g in {self.generation, *self._pins}}
        keep_chunks = {
            chunkfile.chunk_name(c, int(arr[c]))
            for arr in (self._file_gen, *self._pins.values())
            for c in np.flatnonzero(arr >= 0).tolist()
        }
        for n in os.listdir(d):
            stale_manifest = chunkfile.MANIFEST_RE.match(n) and n not in keep_manifests
            stale_chunk = chunkfile.CHUNK_RE.match(n) and n not in keep_chunks
            temp = n.startswith(".") and n.endswith(".tmp")
            if stale_manifest or stale_chunk or temp:
                self._unlink(d / n)

    def _read_manifest_quiet(self, g: int) -> np.ndarray:
        """A pinned manifest's chunk list, without touching this store's init settings."""
        saved = (self._init, self._init_std, self._seed)
        try:
            return self._read_manifest(g)
        finally:
            self._init, self._init_std, self._seed = saved
