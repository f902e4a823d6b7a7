"""The training engine: micro-steps, inner steps, outer steps, checkpoints.

One inner step = ``accumulation`` micro-batches of ``train.batch_size`` whose
gradients accumulate to ``train.effective_batch_size`` (over all ranks), then
one optimizer step. Every ``train.inner_steps_per_outer`` inner steps an outer
step applies the pseudo-gradient (``outer.py``); ``inner_step`` then restarts
at 0 and ``outer_step`` counts up, as subnet-38 miners number them.

Checkpoints hold everything resuming needs (model, optimizers, counters, the
data position, RNG states), so N steps, a stop, and N more give the same
parameters as 2N steps straight.

A sharded model (``Parts.sharded``: the job's ranks hold one model together) makes a few
things collectives that are otherwise the main rank's alone: checkpoints (every rank
writes its slices, at a step all of them agree on), evaluations (every rank runs the
forward pass; the main rank reports) and reading the parameters.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch
from torch import nn

from daemon import disk
from daemon.checkpoint import Checkpoint, CheckpointStore
from daemon.config import Config
from daemon.distributed import CommCounter, any_rank, any_ranks
from daemon.engine.checkpoints import Checkpoints
from daemon.engine.progress import Counters, Progress, Summary
from daemon.engine.protocols import (
    BatchPos,
    EvalPoint,
    GroupJoin,
    OuterStep,
    Sampler,
    Stateful,
    StepContext,
    StepHook,
    StopSignal,
    Task,
)
from daemon.engine.run_state import RunState
from daemon.errors import TrainingDiverged
from daemon.metrics import CoreMetrics
from daemon.sharding import gradient_sync, reshard
from daemon.state import MinerState
from daemon.telemetry import StepReporter, Throughput

log = structlog.get_logger("minerd.train")

PAUSE_POLL_SECONDS = 0.2


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``train.amp`` means on ``device``; None = full precision."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    return torch.bfloat16


@dataclass
class Parts:
    """What the engine runs on, built by the composition root: finished, never changed afterwards."""

    cfg: Config
    task: Task
    model: nn.Module  # possibly wrapped (DDP); the underlying module is ``model.module``
    optimizer: torch.optim.Optimizer
    outer: OuterStep
    sampler: Sampler
    device: torch.device
    store: CheckpointStore | None  # read by every rank, written by the main rank only
    accumulation: int
    world_size: int = 1
    hooks: list[StepHook] = field(default_factory=list)
    stateful: dict[str, Stateful] = field(default_factory=dict)
    is_main: bool = True  # rank 0: writes checkpoints, evaluates
    comm: CommCounter = field(default_factory=CommCounter)
    throughput: Throughput = field(default_factory=Throughput)
    on_disk_full: disk.DiskFullReporter = field(default_factory=disk.DiskFullReporter)
    join: GroupJoin | None = None  # a group to get in step with before the first inner step
    sharded: bool = False  # the job's ranks hold one model together (train.sharding=fsdp)


class _StateExchange:
    """The trainer's whole state for a group's peers (``GroupJoin``): what a live replica hands
    a recovering one, and takes in when it is the one behind."""

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = trainer

    def save(self) -> dict[str, Any]:
        t = self._trainer
        return t.kept.for_peer(t.last_loss)

    def load(self, state: dict[str, Any]) -> None:
        t = self._trainer
        t.last_loss = t.kept.from_peer(state)
        t._publish_counters()


class Trainer:
    def __init__(self, parts: Parts, state: MinerState, metrics: CoreMetrics, stop: StopSignal) -> None:
        self.p = parts
        self.cfg = parts.cfg
        self.state = state
        self.metrics = metrics
        self.stop = stop
        self.c = Counters()
        self.reporter = StepReporter(self.cfg.telemetry, metrics, parts.device)
        self.amp_dtype = amp_dtype(self.cfg.train.amp, parts.device)
        fp16 = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(parts.device.type, enabled=fp16)
        self.last_loss: float | None = None
        self.last_eval: dict[str, float] = {}
        self.checkpoints = Checkpoints(parts.store, self.cfg.checkpoint, parts.is_main, state, metrics,
                                       parts.on_disk_full)
        self._lr = 0.0  # of the inner step under way
        self._grad_scale = 1.0  # the loss scale of the last applied inner step's gradients
        self._restored_without_progress = False  # restored after non-finite steps, none finite since
        # What the run continues from, read and restored whole (checkpoints, peers).
        self.kept = RunState(lambda: self.model, parts.optimizer, parts.outer, self.scaler, self.c, parts.stateful,
                             parts.sharded)

    # ---- set-up -----------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The model as trained: never the DDP wrapper around it."""
        return getattr(self.p.model, "module", self.p.model)

    @property
    def progress(self) -> Progress:
        c = self.c
        return Progress(**c.as_dict())

    def summary(self) -> Summary:
        return Summary(self.progress, self.p.comm.bytes, self.last_loss, dict(self.last_eval))

    def _loss_scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def _step_context(self, grad_scale: float) -> StepContext:
        c, p = self.c, self.p
        return StepContext(
            outer_step=c.outer_step, inner_step=c.inner_step, global_step=c.global_step, epoch=c.epoch,
            lr=self._lr, loss=self.last_loss, grad_scale=grad_scale,
            device=p.device, model=self.model, optimizer=p.optimizer, anchor=p.outer.anchor, comm=p.comm,
        )

    def resume(self) -> bool:
        ckpt = self.checkpoints.latest(self.p.device)
        if ckpt is None:
            return False
        self._restore(ckpt)
        c = self.c
        extra: dict[str, Any] = {}
        if self.cfg.telemetry.param_digest:
            # Of the whole model whatever the sharding: a job of another world size that resumed the
            # same checkpoint says the same digest.
            extra["weights_digest"] = self.kept.whole_digest(self.p.is_main)
        log.info(
            f"Resumed from checkpoint at outer step {c.outer_step}, inner step {c.inner_step} "
            f"(global step {c.global_step})",
            line=True,
            path=str(ckpt.path),
            epoch=c.epoch,
            **extra,
        )
        return True

    def _restore(self, ckpt: Checkpoint) -> None:
        self.last_loss = self.kept.restore(ckpt)
        self._publish_counters()
        self.checkpoints.restored(self.c.global_step)

    def training_state(self) -> dict[str, Any]:
        """Everything but the weights that a run continues from (``RunState.training``)."""
        return self.kept.training(self.last_loss)

    # ---- checkpoints ------------------------------------------------------
    def checkpoint(self, reason: str) -> None:
        """Write a checkpoint now (the main rank, or every rank of a sharded model; once per
        step; a full disk skips it)."""
        c = self.c
        meta = lambda: {"outer_step": c.outer_step, "inner_step": c.inner_step,  # noqa: E731
                        "config_hash": self.cfg.digest(), "world_size": self.p.world_size}
        if self.p.sharded:
            self.checkpoints.save_sharded(c.global_step, reason, self.kept.shards(), self.p.device,
                                          lambda: (self.kept.beside_shards(self.last_loss), meta()))
            return
        self.checkpoints.save(c.global_step, reason,
                              lambda: (self.model.state_dict(), self.training_state(), meta()))

    def checkpoint_bytes(self) -> int:
        """Room one checkpoint may take (see ``Checkpoints.room``)."""
        return self.checkpoints.room(self.model.state_dict())

    # ---- the loop ---------------------------------------------------------
    def lr_at(self, global_step: int) -> float:
        t = self.cfg.train
        if t.warmup_steps <= 0:
            return t.lr
        return t.lr * min(1.0, (global_step + 1) / t.warmup_steps)

    def _done(self) -> str | None:
        t = self.cfg.train
        # Ranks agree on stopping, so none waits in a collective for one that left.
        if any_rank(self.stop.requested, self.p.device):
            return "signal"
        if t.max_steps and self.c.global_step >= t.max_steps:
            return "max_steps"
        if t.epochs and self.c.epoch > t.epochs:
            return "epochs"
        return None

    def run(self) -> str:
        """Train until stopped; returns why it stopped."""
        self.p.model.train()
        self.state.phase = "training"
        self._publish_counters()
        if self.p.join is not None:  # a group to get in step with first; a stop may come meanwhile
            self._after_outer(self.p.join.join(self.stop, _StateExchange(self)), joining=True)
        while (reason := self._done()) is None:
            if self._handle_controls():
                continue
            outcome = self.inner_step()
            if outcome == "abandoned":
                return "signal"
            due = (self.checkpoints.agreed_due(self.c.global_step, self.p.device) if self.p.sharded
                   else self.checkpoints.due(self.c.global_step))
            if due:
                self.checkpoint("periodic")
        return reason

    def _handle_controls(self) -> bool:
        ctl = self.state.controls
        asked, paused = ctl.checkpoint.is_set(), ctl.paused.is_set()
        if self.p.sharded:  # asked of one rank's API, written by all of them: one collective for both
            asked, paused = any_ranks([asked, paused], self.p.device)
        else:
            paused = any_rank(paused, self.p.device)
        if asked:
            ctl.checkpoint.clear()
            self.checkpoint("requested")
        if paused:
            # A deliberate pause is not a stall: keep the heartbeat while waiting.
            self.state.beat()
            time.sleep(PAUSE_POLL_SECONDS)
            return True
        return False

    def _micro_batches(self) -> Iterator[tuple[torch.Tensor, BatchPos]]:
        for _ in range(self.p.accumulation):
            if self.c.batch_pos >= self.p.sampler.batches_per_epoch:
                self._end_epoch()
            pos = BatchPos(self.c.epoch, self.c.batch_pos)
            idx = self.p.sampler.batch(pos.epoch, pos.index)
            self.c.batch_pos += 1
            yield idx, pos

    def _sync_context(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        if self.p.sharded:
            gradient_sync(self.p.model, last)  # reduce-scatter after the last micro-batch only
            return contextlib.nullcontext()
        no_sync = getattr(self.p.model, "no_sync", None)
        return contextlib.nullcontext() if last or no_sync is None else no_sync()

    def inner_step(self) -> str:
        p, c = self.p, self.c
        t0 = time.perf_counter()
        start = Counters(**c.as_dict())
        lr = self._lr = self.lr_at(c.global_step)
        for group in p.optimizer.param_groups:
            group["lr"] = lr
        if p.hooks:
            before = self._step_context(self._loss_scale())
            for hook in p.hooks:
                hook.before_inner_step(before)
        total = torch.zeros((), device=p.device)
        samples = 0
        data_wait = 0.0
        for i, (idx, pos) in enumerate(self._micro_batches()):
            # Abandoning alone would leave peers waiting in a collective: one process only.
            if p.world_size == 1 and self.stop.abandon_partial_step():
                p.optimizer.zero_grad(set_to_none=True)
                self.c.__dict__.update(start.__dict__)  # in place: the run state holds this object
                log.warning("shutdown deadline near: abandoning the partial inner step", micro_batch=i)
                return "abandoned"
            td = time.perf_counter()
            batch = p.task.get_batch(idx, p.device, pos)
            data_wait += time.perf_counter() - td
            with self._sync_context(i == p.accumulation - 1), self._autocast():
                loss = p.task.loss(p.model, batch, c.global_step) / p.accumulation
            self.scaler.scale(loss).backward()
            total += loss.detach()
            samples += len(idx)
            self.state.beat()
        self.metrics.data_wait.inc(data_wait)
        loss_value = float(total)  # a device sync: one per inner step, for the log and the finiteness check
        c.samples += samples * p.world_size
        if any_rank(not math.isfinite(loss_value), p.device):
            return self._nonfinite(loss_value)
        c.nonfinite_in_row = 0
        if self._restored_without_progress:
            self._restored_without_progress = False
            self.state.live_problem = None
        if self.cfg.train.grad_clip > 0:
            self.scaler.unscale_(p.optimizer)
            nn.utils.clip_grad_norm_(p.model.parameters(), self.cfg.train.grad_clip)
        # The scale this step's gradients carry, before update() may change it for the next.
        self._grad_scale = self._loss_scale()
        self.scaler.step(p.optimizer)
        self.scaler.update()
        p.optimizer.zero_grad(set_to_none=True)
        c.inner_step += 1
        c.global_step += 1
        if c.inner_step >= self.cfg.train.inner_steps_per_outer:
            self._after_outer(p.outer.step())
        seconds = time.perf_counter() - t0
        self.last_loss = loss_value
        self._after_step(lr, loss_value, seconds, samples * p.world_size)
        every = p.task.eval_every_steps
        if every and c.global_step % every == 0:
            self._evaluate(EvalPoint(c.epoch, c.global_step))
        if c.batch_pos >= p.sampler.batches_per_epoch:
            self._end_epoch()
        return "ok"

    def _after_outer(self, report: dict[str, Any] | None, joining: bool = False) -> None:
        """Count a committed outer step; an outer sync that found no group keeps the round's
        progress (the next one carries it) and starts the next round."""
        c = self.c
        if report is None:
            return
        if report.get("committed", True):
            # An outer sync that moved this replica to a later point of the group's training (a
            # global revision of a later round) says where: the learning-rate schedule follows.
            position = report.pop("position", None)
            if position is not None and int(position) > c.global_step:
                c.global_step = int(position)
            if c.inner_step > 0:  # a join with nothing trained in its round is not a round
                c.outer_step += 1
            c.inner_step = 0
            self._publish_counters()
            if joining:
                # The outer sync names what it joined (torchft's line by default, which operators grep).
                head = report.pop("joined", "FT JOINED: in step with the group")
                log.info(f"{head} at outer step {c.outer_step} (global step {c.global_step})",
                         outer_step=c.outer_step, **report)
            else:
                log.info("outer step applied", outer_step=c.outer_step, **report)
        else:
            c.inner_step = 0
            log.warning(f"OUTER SYNC FAILED: {report.get('error', 'no quorum')}; this round's progress is kept "
                        "and goes with the next outer step", outer_step=c.outer_step, **report)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.p.device.type, dtype=self.amp_dtype)

    def _nonfinite(self, loss_value: float) -> str:
        p, c = self.p, self.c
        p.optimizer.zero_grad(set_to_none=True)
        c.nonfinite_in_row += 1
        self.metrics.nonfinite_steps.inc()
        log.warning("non-finite loss: inner step skipped", loss=str(loss_value),
                    in_a_row=c.nonfinite_in_row, global_step=c.global_step)
        limit = self.cfg.train.max_nonfinite_in_row
        if c.nonfinite_in_row >= limit:
            if self._restored_without_progress:
                # Restoring again would loop for ever while looking alive: end the process instead.
                raise TrainingDiverged(f"{limit} non-finite inner steps in a row again after restoring the last "
                                       "good checkpoint: no finite step is possible from it; exiting for a fresh "
                                       "start")
            ckpt = self.checkpoints.latest(p.device)
            if ckpt is None:
                log.error("non-finite losses in a row and no checkpoint to restore; continuing")
                c.nonfinite_in_row = 0
            else:
                self._restore(ckpt)
                log.error("non-finite losses in a row: restored the last good checkpoint",
                          path=str(ckpt.path), global_step=self.c.global_step)
            self._restored_without_progress = True
            self.state.live_problem = (f"{limit} non-finite inner steps in a row; restored, and no finite step "
                                       "since")
        # A skipped step is no progress: the heartbeat is left alone (the watchdog still sees a
        # loop of them as a stall).
        return "nonfinite"

    def _after_step(self, lr: float, loss: float, seconds: float, samples: int) -> None:
        c, s = self.c, self.state
        s.loss, s.learning_rate, s.last_step_seconds = loss, lr, seconds
        s.samples_per_second = samples / seconds if seconds > 0 else None
        s.last_step_time = time.time()
        rates = self.p.throughput.measure(samples, seconds, self.p.world_size)
        if rates:
            s.tokens_per_second, s.mfu = rates.get("tokens_per_s"), rates.get("mfu")
            s.tokens_total = self.p.throughput.tokens_total
        self._publish_counters()
        extra: dict[str, object] = {"param_digest": self.param_digest()} if self.cfg.telemetry.param_digest else {}
        self.reporter.report(c.global_step, c.outer_step, c.inner_step, lr, loss, seconds, samples, **rates, **extra)
        if not s.first_step_done:
            s.first_step_done = True
            s.beat()  # tells listeners (systemd READY=1) right away
        if self.p.hooks:
            after = self._step_context(self._grad_scale)
            for hook in self.p.hooks:
                hook.after_inner_step(after)

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds of the training state (``RunState.rank_bytes``)."""
        return self.kept.rank_bytes()

    def param_digest(self) -> str:
        """A digest of every parameter's bytes: equal digests on two ranks = equal weights."""
        return self.kept.local_digest()

    def _publish_counters(self) -> None:
        s, c = self.state, self.c
        s.outer_step, s.inner_step, s.global_step, s.epoch = c.outer_step, c.inner_step, c.global_step, c.epoch

    def _evaluate(self, at: EvalPoint) -> None:
        # Rank 0 evaluates for the job and the others go on training; a sharded model's forward
        # pass needs every rank, and rank 0 reports.
        if not self.p.is_main and not self.p.sharded:
            return
        with self._autocast():
            result = self.p.task.evaluate(self.p.model, self.p.device, at, self.state.beat)
        if self.p.sharded:
            reshard(self.model)
        if not self.p.is_main:
            return
        self.last_eval = dict(result.metrics)
        self.state.eval = dict(result.metrics)
        self.state.eval_epoch, self.state.eval_global_step = at.epoch, at.global_step
        log.info(result.line, line=True, epoch=at.epoch, global_step=at.global_step, **result.metrics)

    def _end_epoch(self) -> None:
        if not self.p.task.eval_every_steps:
            self._evaluate(EvalPoint(self.c.epoch, self.c.global_step))
        self.c.epoch += 1
        self.c.batch_pos = 0
        self.state.epoch = self.c.epoch
