"""The order a rank trains a prepared dataset in, which anyone holding its index can replay.

The sequences of a micro-batch are a pure function of (dataset digest, ``train.seed``,
replica, rank, position), computed in constant memory: no array of every sequence id is
ever made. An epoch walks the training shards in a shuffled order and, within each shard,
its sequences in a shuffled order; both shuffles are keyed bijections (a Feistel network
over the next even power of two, walked back into range), so position ``p`` of an epoch
maps to its sequence in a few integer operations. All ranks and replicas walk the same
shards together (one shard in use, the next one prefetched), each taking its own slice of
every global batch: ``replicas x world x batch_size`` positions, of which replica ``r``,
rank ``k`` takes the ``(r * world + k)``-th run of ``batch_size``. Replicas that declare
no count (``replicas`` 0) each shuffle in their own order instead, keyed by their id.

A sequence id is global and stable: training shards in index order, each cut into
``(tokens - 1) // seq_len`` windows of ``seq_len + 1`` tokens, numbered in turn.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def _keys(*parts: object) -> np.ndarray:
    raw = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


class Permutation:
    """A bijection of ``[0, n)`` keyed by ``parts``: ``perm(positions)`` gives their images."""

    def __init__(self, n: int, *parts: object) -> None:
        self.n = n
        bits = max(2, (max(n, 1) - 1).bit_length())
        bits += bits % 2
        self._half = np.uint64(bits // 2)
        self._mask = np.uint64((1 << (bits // 2)) - 1)
        self._keys = _keys(*parts)

    def _round(self, r: np.ndarray, k: np.uint64) -> np.ndarray:
        x = (r ^ k) * _M1  # uint64 arithmetic wraps, as this mixing wants
        x ^= x >> np.uint64(30)
        x *= _M2
        x ^= x >> np.uint64(27)
        x *= _M3
        x ^= x >> np.uint64(31)
        return x & self._mask

    def _once(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for k in self._keys:
            left, right = right, left ^ self._round(right, k)
        return (left << self._half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        if self.n <= 1:
            return np.zeros(len(positions), dtype=np.int64)
        with np.errstate(over="ignore"):
            out = self._once(np.asarray(positions, dtype=np.uint64))
            outside = out >= np.uint64(self.n)
            while outside.any():  # cycle walking: at most a few rounds, the domain is under 4n
                out[outside] = self._once(out[outside])
                outside = out >= np.uint64(self.n)
        return out.astype(np.int64)


class DatasetOrder:
    """This rank's micro-batches of a prepared dataset: ``batch(epoch, index)`` gives the
    sequence ids of its share of global batch ``index`` of ``epoch`` (both as the trainer
    counts them, epochs from 1)."""

    def __init__(self, digest: str, seed: int, sequences: Sequence[int], batch_size: int, rank: int = 0,
                 world_size: int = 1, replica: int = 0, replicas: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if replicas and not 0 <= replica < replicas:
            raise ValueError(f"replica {replica} outside the {replicas} replicas")
        self.digest, self.seed = digest, seed
        self.sequences = np.asarray(sequences, dtype=np.int64)  # per training shard, index order
        self.base = np.concatenate([[0], np.cumsum(self.sequences)]).astype(np.int64)
        self.num_items = int(self.base[-1])
        self.batch_size = batch_size
        slots = max(replicas, 1)
        self._slot = (replica if replicas else 0) * world_size + rank
        self._stride = slots * world_size * batch_size
        # Replicas without a declared count each shuffle their own way: same data, another order.
        self._salt = "shared" if replicas else f"replica {replica}"
        self._epoch: int | None = None
        self._shards = np.zeros(0, dtype=np.int64)
        self._starts = np.zeros(1, dtype=np.int64)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // self._stride

    def _walk(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's shard order and the first position of each shard in it."""
        if epoch != self._epoch:
            n = len(self.sequences)
            self._shards = Permutation(n, self.digest, self.seed, epoch, "shards", self._salt)(np.arange(n))
            self._starts = np.concatenate([[0], np.cumsum(self.sequences[self._shards])]).astype(np.int64)
            self._epoch = epoch
        return self._shards, self._starts

    def ids_at(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        shards, starts = self._walk(epoch)
        j = np.searchsorted(starts, positions, side="right") - 1
        out = np.empty(len(positions), dtype=np.int64)
        for walk_pos in np.unique(j):
            sel = j == walk_pos
            shard = int(shards[walk_pos])
            local = positions[sel] - starts[walk_pos]
            perm = Permutation(int(self.sequences[shard]), self.digest, self.seed, epoch, shard, self._salt)
            out[sel] = self.base[shard] + perm(local)
        return out

    def batch_positions(self, index: int) -> np.ndarray:
        start = index * self._stride + self._slot * self.batch_size
        return np.arange(start, start + self.batch_size, dtype=np.int64)

    def batch(self, epoch: int, index: int) -> torch.Tensor:
        return torch.from_numpy(self.ids_at(epoch, self.batch_positions(index)))

    def shards_ahead(self, epoch: int, index: int, count: int) -> list[int]:
        """Training shards (index order numbers) the walk reaches after the one holding the
        first position of batch ``index``, ``count`` of them at most: what to fetch next."""
        shards, starts = self._walk(epoch)
        first = int(np.searchsorted(starts, index * self._stride, side="right")) - 1
        ahead = [int(s) for s in shards[first + 1 : first + 1 + count]]
        if len(ahead) < count and len(shards):  # the next epoch's first shards
            nxt, _ = self._walk(epoch + 1)
            ahead += [int(s) for s in nxt[: count - len(ahead)]]
            self._walk(epoch)
        return ahead

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.base, ids, side="right") - 1
