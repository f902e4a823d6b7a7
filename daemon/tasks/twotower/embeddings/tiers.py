"""The L1/L2 memory tiers of a disk-mode embedding store: one pool of chunk slots.

Slots of one array labelled free, L1 (protected) or L2 (probationary), with the
segmented-LRU moves described in the :mod:`daemon.tasks.twotower.embeddings.store` docstring:
load into L2, promote on an L2 hit, demote L1's least recently used, evict L2
first and write dirty chunks back under the pending generation. Lookups and
updates are vectorised gathers and scatters over the pool, with Python work per
chunk touched, never per id. Kept apart from the facade so the cache policy reads
on its own; the files it reads and writes are :mod:`daemon.tasks.twotower.embeddings.generations`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

import daemon.tasks.twotower.embeddings.chunkfile as chunkfile
from daemon.tasks.twotower.embeddings.generations import ChunkGenerations

_MB = 1024 * 1024
_NOT_RESIDENT = 3  # tier label of the sentinel slot that slot -1 indexes
_PROTECT = np.int64(1) << 62


class TieredChunkCache(ChunkGenerations):
    """The slot pool and its tiers; a base of ``EmbeddingStore``, which sets ``_stats``,
    ``_tick`` and ``_chunk_bytes`` and calls :meth:`_setup_pool` in disk mode."""

    _stats: dict[str, int]
    _tick: int  # advanced per call; a slot stamped with the current tick is not evicted
    _chunk_bytes: int
    _n_slots: int
    _n_l1: int
    _pool: np.ndarray
    _pool2d: np.ndarray
    _tier: np.ndarray
    _stamp: np.ndarray
    _dirty: np.ndarray
    _chunk_of_slot: np.ndarray
    _slot_of_chunk: np.ndarray

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
