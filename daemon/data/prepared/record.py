"""What a window of training read, as a validator replays it.

A window is the micro-batches of one outer step, as the trainer counts them from the start
of the run: window ``w`` holds inner steps ``w * H`` to ``(w + 1) * H - 1`` (``H`` =
``train.inner_steps_per_outer``), each ``accumulation`` micro-batches. ``minerd data sample``
prints a window's sequence ids; a revision's manifest carries the digest of the last window
it trained, per rank, so anyone with the dataset's index can check the data it claims.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from daemon.config import ConfigError
from daemon.data.prepared.index import Index
from daemon.data.prepared.order import DatasetOrder


@dataclass(frozen=True)
class Window:
    """Where a window sits in the micro-batch stream: ``micro_batches`` of them per window
    (inner steps per outer step times accumulation), for this rank."""

    micro_batches: int

    def positions(self, order: DatasetOrder, window: int) -> list[tuple[int, int]]:
        per_epoch = order.batches_per_epoch
        first = window * self.micro_batches
        return [(g // per_epoch + 1, g % per_epoch) for g in range(first, first + self.micro_batches)]


def sample_ids(index: Index, seed: int, seq_len: int, batch_size: int, world_size: int, rank: int, replica: int,
               replicas: int, micro_batches: int, window: int) -> np.ndarray:
    """The sequence ids rank ``rank`` of replica ``replica`` trains in ``window``, in order."""
    sequences = [max(0, (s.tokens - 1) // seq_len) for s in index.split("train")]
    order = DatasetOrder(index.digest, seed, sequences, batch_size, rank, world_size, replica, replicas)
    if order.batches_per_epoch == 0:
        raise ConfigError(["--dataset: holds fewer sequences than one global batch"])
    parts = [order.batch(e, i).numpy() for e, i in Window(micro_batches).positions(order, window)]
    return np.concatenate(parts)


def ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest()


@dataclass(frozen=True)
class DataRecord:
    """The manifest's ``data`` entry of the revisions of one run."""

    index: Index
    seed: int
    seq_len: int
    batch_size: int
    world_size: int
    replica: int
    replicas: int
    accumulation: int
    inner_steps: int  # per window

    def __call__(self, global_step: int) -> dict[str, Any]:
        last = max(0, -(-global_step // self.inner_steps) - 1)  # the window the step is in, or ends
        micro = self.inner_steps * self.accumulation
        digests = [ids_digest(sample_ids(self.index, self.seed, self.seq_len, self.batch_size, self.world_size,
                                         rank, self.replica, self.replicas, micro, last))
                   for rank in range(self.world_size)]
        return {
            "dataset": self.index.digest,
            "seed": self.seed,
            "replica": self.replica,
            "replicas": self.replicas,
            "world_size": self.world_size,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "micro_batches_per_window": micro,
            "windows": [0, last],
            "global_step": global_step,
            "last_window_sample_ids_sha256": digests,
        }


def replay_ids(index: Index, record: Any, seq_len: int, limit: int) -> np.ndarray | None:
    """The first ``limit`` sequence ids of the last window a (hostile) data record names, rank
    0's; None when the record is of another dataset or its numbers are out of range."""
    if not isinstance(record, dict) or record.get("dataset") != index.digest or record.get("seq_len") != seq_len:
        return None
    raw = {k: record.get(k) for k in ("seed", "replica", "replicas", "world_size", "batch_size",
                                       "micro_batches_per_window")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 40 for v in raw.values()):
        return None
    ints: dict[str, int] = {k: v for k, v in raw.items() if isinstance(v, int)}
    windows = record.get("windows")
    if not (isinstance(windows, list) and len(windows) == 2 and all(isinstance(w, int) and 0 <= w < 1 << 40
                                                                     for w in windows)):
        return None
    world, batch, micro = ints["world_size"], ints["batch_size"], ints["micro_batches_per_window"]
    if not (1 <= world <= 4096 and 1 <= batch <= 1 << 16 and 1 <= micro <= 1 << 20):
        return None
    # Only as many micro-batches as ``limit`` sequences need: the record cannot size the work.
    need = min(micro, -(-limit // batch))
    sequences = [max(0, (s.tokens - 1) // seq_len) for s in index.split("train")]
    replicas = ints["replicas"]
    if replicas and ints["replica"] >= replicas:
        return None
    order = DatasetOrder(index.digest, ints["seed"], sequences, batch, 0, world, ints["replica"], replicas)
    if order.batches_per_epoch == 0:
        return None
    positions = Window(micro).positions(order, windows[1])[:need]
    return np.concatenate([order.batch(e, i).numpy() for e, i in positions])[:limit]
