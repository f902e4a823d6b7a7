"""The trainer's checkpoints: when one is due, writing it, and the room one takes.

Only the main rank writes; every rank reads the one it resumes from. A full disk skips a
checkpoint with one ``DISK FULL`` line (the previous one stays) until the next is due. A
state holding a non-finite tensor is never written: restoring "the last good checkpoint"
must give a state that can train, not the poison again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog
import torch

from daemon import disk
from daemon.checkpoint import Checkpoint, CheckpointStore
from daemon.config import CheckpointConfig
from daemon.distributed import any_rank, barrier
from daemon.engine.sharded import ShardedState
from daemon.metrics import CoreMetrics
from daemon.rowtable import RowTable
from daemon.sharding import any_nonfinite
from daemon.state import MinerState

log = structlog.get_logger("minerd.train")

# What a checkpoint holds, made only when one is really written: the weights, the training
# state and the manifest's facts.
Contents = Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]]


class Checkpoints:
    def __init__(self, store: CheckpointStore | None, cfg: CheckpointConfig, is_main: bool, state: MinerState,
                 metrics: CoreMetrics, on_disk_full: disk.DiskFullReporter) -> None:
        self.store = store
        self.cfg = cfg
        self.is_main = is_main
        self.state = state
        self.metrics = metrics
        self.on_disk_full = on_disk_full
        self._global_step: int | None = None  # of the newest checkpoint written or read
        self.refused = 0  # checkpoints not written for holding non-finite tensors
        self._monotonic: float | None = None  # when this process last wrote one

    def due(self, global_step: int) -> bool:
        """On the step schedule, and not sooner than ``checkpoint.min_interval_seconds`` after the
        last one: a schedule in steps made for slow GPU steps would rewrite the whole state every
        few seconds from a fast job, and a kill loses at most the larger of the two anyway."""
        if global_step % self.cfg.every_inner_steps != 0:
            return False
        return self._monotonic is None or time.monotonic() - self._monotonic >= self.cfg.min_interval_seconds

    def latest(self, device: torch.device) -> Checkpoint | None:
        return self.store.load_latest(map_location=device) if self.store is not None else None

    def restored(self, global_step: int) -> None:
        """Training stands where a checkpoint left it: no need to write that one again."""
        self._global_step = global_step

    def save(self, global_step: int, reason: str, contents: Contents) -> None:
        """Write a checkpoint of ``global_step`` (on the main rank, once per step)."""
        if self.store is None or not self.is_main or self._global_step == global_step:
            return
        try:
            self._write(global_step, reason, contents)
        except OSError as exc:
            if not disk.is_full(exc):
                raise
            self.on_disk_full("checkpoint", self.store.root, exc)

    def save_sharded(self, global_step: int, reason: str, shards: ShardedState, device: torch.device,
                     rest: Callable[[], tuple[dict[str, Any], dict[str, Any]]]) -> None:
        """Write a sharded checkpoint of ``global_step``: every rank calls it, every rank writes
        its slices, the main rank ``rest()`` (the training state beside the weights, optimizer and
        outer state; the manifest's facts) and the manifest."""
        if self.store is None or self._global_step == global_step:
            return
        t0 = time.perf_counter()
        if any_nonfinite(shards.tensors(), device):  # any rank's slice: every rank refuses alike
            self.refused += 1
            if self.is_main:
                log.error("CHECKPOINT REFUSED: a tensor of the sharded weights, optimizer or outer state is not "
                          "finite; the last good checkpoint stays", global_step=global_step, reason=reason)
            return
        training, meta = rest() if self.is_main else ({}, {})
        try:
            path = self.store.save_sharded(global_step, shards.save, training, {**meta, "reason": reason},
                                           self.is_main, barrier)
        except Exception as exc:
            if not disk.is_full(exc):
                raise
            self.on_disk_full("checkpoint", self.store.root, exc)
            return
        self._written(global_step, path, reason, t0)

    def _written(self, global_step: int, path: Any, reason: str, t0: float) -> None:
        self._global_step = global_step
        self._monotonic = time.monotonic()
        if not self.is_main:
            return
        self.state.checkpoint_bytes = self.room({})
        self.metrics.checkpoints.inc()
        self.state.last_checkpoint_time = time.time()
        self.state.beat()
        log.info("checkpoint saved", path=str(path), reason=reason, global_step=global_step,
                 seconds=round(time.perf_counter() - t0, 3), bytes=_folder_bytes(path),
                 depends_on=self.store.depends_on(path) or None if self.store is not None else None)

    def agreed_due(self, global_step: int, device: torch.device) -> bool:
        """``due`` as every rank of a sharded model sees it (their clocks differ a little, and all of
        them must write together). Off the step schedule no rank is due: no collective then."""
        return global_step % self.cfg.every_inner_steps == 0 and any_rank(self.due(global_step), device)

    def room(self, weights: dict[str, torch.Tensor]) -> int:
        """Room one checkpoint may take: the largest one kept (a whole one, when later ones hold
        only the changed rows of a table), else five copies of the weights (weights, two Adam
        moments, the outer step's anchor and momentum)."""
        sizes = [_folder_bytes(p) for p in (self.store.checkpoints() if self.store is not None else [])]
        return max(sizes, default=5 * sum(t.numel() * t.element_size() for t in weights.values()))

    def _write(self, global_step: int, reason: str, contents: Contents) -> None:
        assert self.store is not None
        t0 = time.perf_counter()
        weights, training, meta = contents()
        bad, total = nonfinite({"model": weights, "state": training})
        if bad:
            self.refused += 1
            log.error(f"CHECKPOINT REFUSED: {len(bad)} of {total} tensors are not finite ({', '.join(bad[:3])}"
                      f"{', ...' if len(bad) > 3 else ''}); the last good checkpoint stays", global_step=global_step,
                      reason=reason)
            return
        path = self.store.save(global_step, weights, training, {**meta, "reason": reason})
        self._written(global_step, path, reason, t0)


def _folder_bytes(path: Any) -> int:
    """Bytes of a checkpoint's files, those of its shards/ folder included."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def nonfinite(tree: Any, where: str = "") -> tuple[list[str], int]:
    """(where the floating tensors with a NaN or an infinity sit, how many floating tensors)."""
    bad: list[str] = []
    total = 0

    def walk(x: Any, at: str) -> None:
        nonlocal total
        if isinstance(x, RowTable):
            walk(x.tensors, at)
        elif isinstance(x, torch.Tensor):
            if x.is_floating_point():
                total += 1
                if not bool(torch.isfinite(x).all()):
                    bad.append(at)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{at}.{k}" if at else str(k))
        elif isinstance(x, list | tuple):
            for i, v in enumerate(x):
                walk(v, f"{at}[{i}]")

    walk(tree, where)
    return bad, total
