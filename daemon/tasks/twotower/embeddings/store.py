"""The tiered trainable embedding store.

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
work in Python is per chunk touched, never per id (measured: per-id caches
are slower than a page-cached memmap).

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

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import structlog
import torch

from daemon import disk
from daemon.rowtable import RowChanges
from daemon.tasks.twotower.embeddings.chunkfile import EmbeddingStoreCorrupt
from daemon.tasks.twotower.embeddings.tiers import _MB, TieredChunkCache

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["EmbeddingStore", "EmbeddingStoreCorrupt", "EmbeddingsSettings"]

log = structlog.get_logger(__name__)


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


class EmbeddingStore(TieredChunkCache):
    """Per-row trainable embeddings in memory or in chunk files with L1/L2 memory tiers.

    The memory tiers are :class:`~daemon.tasks.twotower.embeddings.tiers.TieredChunkCache`, the
    chunk files and generations :class:`~daemon.tasks.twotower.embeddings.generations.ChunkGenerations`.
    """

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
        on_disk_full: Callable[[str, Path, BaseException], None] | None = None,
    ) -> None:
        # Told when an automatic sync finds the disk full; the dirty chunks stay in memory and
        # the next sync writes them (the checkpoint's, at the latest).
        self._on_disk_full = on_disk_full
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
        # Which rows changed since when: a checkpoint writes only those after a first whole copy.
        self.changes = RowChanges(self.num_rows)

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
            from daemon.tasks.twotower.embeddings.metrics import EmbeddingCacheCollector

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
        on_disk_full: Callable[[str, Path, BaseException], None] | None = None,
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
            on_disk_full=on_disk_full,
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
            self.changes.mark(idx)
            self._updates_since_sync += 1
            if self.auto_sync and self._updates_since_sync >= self.sync_batch_size:
                try:
                    self._sync()
                except OSError as exc:
                    if self._on_disk_full is None or not disk.is_full(exc):
                        raise
                    self._updates_since_sync = 0  # tried again after another batch of updates
                    self._on_disk_full("embedding chunks", Path(self.dir or "."), exc)

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

    def checkpoint_state(self, copy: bool = True) -> dict[str, Any]:
        """Sync and return what a checkpoint must save to restore this exact table.

        disk: ``{"storage_mode": "disk", "generation": g, "dir": ...}``; the chunk files
        are the persistent state and generation ``g`` is pinned (the last
        ``keep_checkpoints`` pins are kept). Restore by reopening with ``generation=g``.
        memory: ``{"storage_mode": "memory", "table": <tensor copy>}``; restore with
        :meth:`load_checkpoint_state`. ``copy=False`` hands the live table instead, for a
        caller that copies what it keeps itself before the next update (the checkpoint writer).
        """
        with self._lock:
            self._check_open()
            if self._table is not None:
                return {"storage_mode": "memory", "table": self._table.clone() if copy else self._table}
            self._sync()
            self._pin(self.generation)
            return {"storage_mode": "disk", "generation": self.generation, "dir": str(self.dir)}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Memory mode: put back a table from :meth:`checkpoint_state`. Disk mode:
        reopen at the state's generation (same as constructing with ``generation=``)."""
        with self._lock:
            self._check_open()
            self.changes.restart()
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
        """The counters existing callers of ``get_cache_performance()`` read, plus per-tier bytes;
        ``cache_hit_rate`` = L1+L2 hits / lookups."""
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
