"""A prepared dataset opened for training: its index, its tokenizer, and sequences read by id.

Opening reads the index and the tokenizer (both bounded), nothing proportional to the
dataset: shards are read when a batch first needs them (see cache.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.config import ConfigError, problem
from daemon.data.prepared.cache import LocalShards, ShardCache, ShardReader
from daemon.data.prepared.index import MAX_TOKENIZER_BYTES, TOKENIZER, Index, Shard
from daemon.data.prepared.prepare import read_index
from daemon.errors import DataUnreachable
from daemon.storage import LocalStorage, Storage, StorageError, TooLarge, open_storage


@dataclass
class Location:
    storage: Storage
    index: Index
    tokenizer_json: str


def locate(where: str, value: str) -> Location:
    """The index and tokenizer of the dataset at ``value``; ConfigError (one line, naming
    ``where``) when there is none, it is unreadable or they do not agree; StorageError
    when the bucket cannot be reached (the caller waits and tries again)."""
    try:
        storage = open_storage(value)
    except StorageError as exc:
        raise ConfigError([problem(where, str(exc), value)]) from None
    index = read_index(storage, where)
    if index is None:
        raise ConfigError([problem(where, "holds no index.json: not a prepared dataset (see `minerd data "
                                   "prepare`)", value)])
    if not index.split("train"):
        raise ConfigError([problem(where, "its index names no training shard", value)])
    try:
        raw = storage.get_bytes(TOKENIZER, MAX_TOKENIZER_BYTES)
    except TooLarge as exc:
        raise ConfigError([problem(where, f"its {TOKENIZER}: {exc}", value)]) from None
    except StorageError as exc:
        raise DataUnreachable(f"{where}: cannot read {storage.describe()}/{TOKENIZER}: {exc}") from None
    if raw is None:
        raise ConfigError([problem(where, f"has no {TOKENIZER}", value)])
    if hashlib.sha256(raw).hexdigest() != index.tokenizer_sha256:
        raise ConfigError([problem(where, f"its {TOKENIZER} is not the one the index names", value)])
    return Location(storage, index, raw.decode("utf-8", "replace"))


# A local dataset this small is hashed at every start (about 40 ms for the standard library's
# 17 MB); a larger one is checked by size, and by `minerd data inspect --verify` on demand.
VERIFY_AT_START_BYTES = 256 << 20


def mismatched(loc: Location) -> list[str]:
    """Shards of a small local dataset whose bytes do not match the index (empty: all match,
    or the dataset is remote or too large to hash at each start)."""
    if not isinstance(loc.storage, LocalStorage) or sum(s.bytes for s in loc.index.shards) > VERIFY_AT_START_BYTES:
        return []
    bad = []
    for shard in loc.index.shards:
        try:
            got = loc.storage.fetch(shard.name, None, shard.bytes)
        except StorageError:
            got = None
        if got != (shard.bytes, shard.sha256):
            bad.append(shard.name)
    return bad


def reader_for(loc: Location, cache_root: Path, cache_bytes: int) -> ShardReader:
    if isinstance(loc.storage, LocalStorage):
        return LocalShards(loc.storage.root, loc.index)
    return ShardCache(loc.storage, loc.index, cache_root / f"dataset-{loc.index.digest[:16]}", cache_bytes)


class PreparedDataset:
    """Training sequences by global id (see order.py), held-out windows for evaluation."""

    def __init__(self, index: Index, reader: ShardReader, seq_len: int) -> None:
        self.index, self.reader, self.seq_len = index, reader, seq_len
        self.train = index.split("train")
        self.sequences = [max(0, (s.tokens - 1) // seq_len) for s in self.train]
        self.base = np.concatenate([[0], np.cumsum(self.sequences)]).astype(np.int64)
        self._offsets = np.arange(seq_len + 1)

    @property
    def num_sequences(self) -> int:
        return int(self.base[-1])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The ``seq_len + 1`` tokens of each sequence id (one gather per shard touched)."""
        shard_of = np.searchsorted(self.base, ids, side="right") - 1
        out = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)
        for k in np.unique(shard_of):
            sel = shard_of == k
            tokens = self.reader.get(self.train[int(k)])
            starts = (ids[sel] - self.base[k]) * self.seq_len
            out[sel] = tokens[starts[:, None] + self._offsets]
        return out

    def prefetch(self, shard_numbers: list[int]) -> None:
        self.reader.prefetch([self.train[k] for k in shard_numbers])

    def eval_rows(self, count: int) -> np.ndarray:
        """``count`` windows spread evenly over the first held-out shards that hold that many."""
        picked: list[tuple[Shard, int]] = []
        total = 0
        for shard in self.index.split("eval"):
            n = max(0, (shard.tokens - 1) // self.seq_len)
            if n:
                picked.append((shard, n))
                total += n
            if total >= count:
                break
        n = min(count, total)
        if n == 0:
            return np.zeros((0, self.seq_len + 1), dtype=np.int64)
        wanted = np.arange(n, dtype=np.int64) * total // n
        out, first = [], 0
        for shard, k in picked:
            mine = wanted[(wanted >= first) & (wanted < first + k)] - first
            if len(mine):
                tokens = self.reader.get(shard)
                out.append(np.asarray(tokens[(mine * self.seq_len)[:, None] + self._offsets], dtype=np.int64))
            first += k
        return np.concatenate(out)

    def eval_tokens(self) -> int:
        return self.index.tokens("eval")
