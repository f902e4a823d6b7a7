"""Reading a prepared dataset's shards: in place from a local folder, or through a bounded
cache from a bucket.

The cache (``lm.cache_dir``, at most ``lm.cache_bytes``) fetches a shard when it is first
needed and the next ones (``lm.prefetch_shards``) in a background thread while training, so
the trainer waits only for what it could not have known it needed. A shard is verified
against the index once, on arrival (its size, then its sha256; a mismatch is fetched again
once, then refused), and renamed into place only then: a file under its final name is a
verified one, so later starts reuse it without hashing it again. The least recently used
shards make room for new ones; the one being read and those in flight are never evicted.
A full disk shrinks the cache instead of stopping the run.
"""

from __future__ import annotations

import errno
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import structlog

from daemon.data.prepared.index import SHARD_RE, Index, Shard
from daemon.errors import DataRefused, DataUnreachable
from daemon.storage import Storage, StorageError

log = structlog.get_logger("minerd.data")

FETCH_ATTEMPTS = 5  # a failed fetch is retried with backoff: 1, 2, 4, 8 s


class ShardRefused(DataRefused):
    """A shard that does not match the index (fetched twice), or is not there."""


@dataclass
class CacheStats:
    observe: Callable[[float], None] | None = None  # each fetch's seconds, as it ends (a histogram)
    fetches: int = 0
    fetch_seconds: float = 0.0
    fetch_bytes: int = 0
    refetches: int = 0  # fetches repeated because a shard did not match its checksum


class ShardReader(Protocol):
    stats: CacheStats
    fetches: bool  # whether shards arrive over a network (then worth asking for ahead of need)

    def get(self, shard: Shard) -> np.ndarray:
        """The shard's tokens (a memory map), fetched first when need be."""

    def prefetch(self, shards: list[Shard]) -> None: ...

    def cached(self) -> tuple[int, int]:
        """(shards held, their bytes) on this machine's disk, for the cache gauges."""

    def close(self) -> None: ...


def _map(path: Path, shard: Shard, dtype: str) -> np.ndarray:
    if shard.tokens == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(shard.tokens,))


class LocalShards:
    """A dataset in a local folder is read where it is: sizes checked when a shard is first
    opened; checksums by ``minerd data inspect --verify`` (hashing a large dataset at every
    start is what this format exists to avoid)."""

    fetches = False

    def __init__(self, root: Path, index: Index) -> None:
        self.root, self.index, self.stats = root, index, CacheStats()
        self._open: dict[str, np.ndarray] = {}

    def get(self, shard: Shard) -> np.ndarray:
        arr = self._open.get(shard.name)
        if arr is None:
            path = self.root / shard.name
            try:
                size = path.stat().st_size
            except OSError as exc:
                raise ShardRefused(f"{path}: cannot read it ({exc.strerror or exc})") from None
            if size != shard.bytes:
                raise ShardRefused(f"{path} holds {size} bytes; the index says {shard.bytes}")
            arr = self._open[shard.name] = _map(path, shard, self.index.dtype)
        return arr

    def prefetch(self, shards: list[Shard]) -> None:
        pass

    def cached(self) -> tuple[int, int]:
        return len(self._open), sum(s.bytes for s in self.index.shards if s.name in self._open)

    def close(self) -> None:
        self._open.clear()


class ShardCache:
    fetches = True

    def __init__(self, storage: Storage, index: Index, folder: Path, max_bytes: int) -> None:
        self.storage, self.index, self.folder, self.max_bytes = storage, index, folder, max_bytes
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._held: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recently used first
        self._inflight: dict[str, Future[None]] = {}
        self._maps: dict[str, np.ndarray] = {}
        self._current = ""
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="minerd-shards")
        folder.mkdir(parents=True, exist_ok=True)
        by_name = {s.name: s for s in index.shards}
        for path in sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime_ns):
            shard = by_name.get(path.name)
            # A file under a shard's own name was verified when it arrived; anything else
            # (a partial download, a shard of another dataset) goes.
            if shard is not None and path.is_file() and path.stat().st_size == shard.bytes:
                self._held[path.name] = shard.bytes
            elif path.is_file() and (shard is not None or SHARD_RE.match(path.name) or path.name.endswith(".part")):
                path.unlink(missing_ok=True)

    # ---- reading -----------------------------------------------------------------------
    def get(self, shard: Shard) -> np.ndarray:
        with self._lock:
            self._current = shard.name
            if shard.name in self._held:
                self._held.move_to_end(shard.name)
                fut = None
            else:
                fut = self._inflight.get(shard.name) or self._submit(shard)
        if fut is not None:
            fut.result()  # the fetch's own exception (refused, unreachable) reaches the trainer
        arr = self._maps.get(shard.name)
        if arr is None:
            arr = self._maps[shard.name] = _map(self.folder / shard.name, shard, self.index.dtype)
        return arr

    def prefetch(self, shards: list[Shard]) -> None:
        with self._lock:
            for shard in shards:
                if shard.name not in self._held and shard.name not in self._inflight:
                    self._submit(shard)

    def cached(self) -> tuple[int, int]:
        with self._lock:
            return len(self._held), sum(self._held.values())

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._maps.clear()

    # ---- fetching (in the cache's thread) ----------------------------------------------
    def _submit(self, shard: Shard) -> Future[None]:
        fut = self._inflight[shard.name] = self._pool.submit(self._fetch, shard)
        return fut

    def _make_room(self, need: int) -> None:
        with self._lock:
            keep = {self._current, *self._inflight}
            for name in list(self._held):
                if sum(self._held.values()) + need <= self.max_bytes:
                    break
                if name in keep:
                    continue
                del self._held[name]
                self._maps.pop(name, None)  # a map still in a reader's hands stays valid (Linux)
                (self.folder / name).unlink(missing_ok=True)

    def _fetch(self, shard: Shard) -> None:
        try:
            self._fetch_verified(shard)
        finally:
            with self._lock:
                self._inflight.pop(shard.name, None)

    def _fetch_verified(self, shard: Shard) -> None:
        part = self.folder / f".{shard.name}.part"
        mismatches = 0
        for attempt in range(1, 2 * FETCH_ATTEMPTS + 1):
            self._make_room(shard.bytes)
            part.unlink(missing_ok=True)
            t0 = time.perf_counter()
            try:
                got = self.storage.fetch(shard.name, part, shard.bytes)
            except StorageError as exc:
                part.unlink(missing_ok=True)
                if attempt >= FETCH_ATTEMPTS:
                    raise DataUnreachable(f"shard {shard.name} not fetched after {attempt} tries: {exc}") from None
                log.warning("shard fetch failed; retrying", shard=shard.name, attempt=attempt, error=str(exc)[:200])
                time.sleep(min(2 ** (attempt - 1), 8))
                continue
            except OSError as exc:
                part.unlink(missing_ok=True)
                if exc.errno != errno.ENOSPC or attempt >= FETCH_ATTEMPTS:
                    raise
                self._shrink(shard)
                continue
            self.stats.fetches += 1
            seconds = time.perf_counter() - t0
            self.stats.fetch_seconds += seconds
            if self.stats.observe is not None:
                self.stats.observe(seconds)
            self.stats.fetch_bytes += got[0] if got else 0
            if got is not None and got == (shard.bytes, shard.sha256):
                part.replace(self.folder / shard.name)
                with self._lock:
                    self._held[shard.name] = shard.bytes
                return
            part.unlink(missing_ok=True)
            mismatches += 1
            what = "is missing" if got is None else (
                f"holds {got[0]} bytes, not {shard.bytes}" if got[0] != shard.bytes else "does not match its sha256")
            if mismatches >= 2:
                raise ShardRefused(f"shard {shard.name} at {self.storage.describe()} {what} in the index, "
                                   "twice; refused")
            self.stats.refetches += 1
            log.warning(f"shard {shard.name} {what}; fetching it again", shard=shard.name)
        raise ShardRefused(f"shard {shard.name}: no verified copy after {2 * FETCH_ATTEMPTS} tries")

    def _shrink(self, shard: Shard) -> None:
        with self._lock:
            used = sum(self._held.values())
        smaller = max(used - shard.bytes, 2 * max(s.bytes for s in self.index.shards))
        if smaller < self.max_bytes:
            log.warning(f"DISK FULL: the shard cache at {self.folder} cannot grow; it now keeps at most "
                        f"{smaller} bytes (lm.cache_bytes was {self.max_bytes})", cache_bytes=smaller)
            self.max_bytes = smaller
        time.sleep(1.0)
