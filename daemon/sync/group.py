"""Inside one torchrun job: how its ranks keep together (``train.sync``).

Under DDP gradients are averaged every inner step, so the ranks' parameters agree and
their pseudo-gradients need no averaging; under DiLoCo each rank trains alone between
outer steps and the pseudo-gradient is averaged over the ranks (a dense all-reduce, or
``train.outer_compression``'s codec). A process alone needs neither.

A sharded model (``train.sharding=fsdp``) is one model held by all the job's ranks: its
gradients are reduced into each rank's shards at every inner step, so the job is one
replica, as under DDP, whatever ``train.sync`` says; each rank's outer step moves its own
shards, and replicas of it average across machines (torchft) rank by rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from daemon.compression import CodecSpec
from daemon.compression.sync import CompressedAverage
from daemon.distributed import averaging_reduce, wrap_ddp
from daemon.engine.outer import OuterOptimizer, Reduce, identity_reduce
from daemon.engine.protocols import Stateful
from daemon.plugin.parts import SyncContext, SyncParts


@dataclass
class Group:
    model: nn.Module  # as the trainer calls it
    reduce: Reduce  # the pseudo-gradient over the job's ranks
    stateful: dict[str, Stateful] = field(default_factory=dict)
    compresses: bool = False  # reports to the run's CompressionStats


def _alone(ctx: SyncContext) -> Group:
    return Group(ctx.model, identity_reduce)


def _ddp(ctx: SyncContext) -> Group:
    # Parameters agree after every inner step: the pseudo-gradient is the same on every rank.
    return Group(wrap_ddp(ctx.model, ctx.device, ctx.comm), identity_reduce)


def _diloco(ctx: SyncContext) -> Group:
    codec = ctx.cfg.train.outer_compression
    if codec == "none":
        return Group(ctx.model, averaging_reduce(ctx.comm))
    cc = ctx.cfg.compression
    names = [name for name, _ in ctx.model.named_parameters()]
    average = CompressedAverage(names, CodecSpec.of(codec, cc.block, cc.keep, cc.quantize), ctx.comm,
                                ctx.compression, ctx.launch.rank, ctx.device)
    return Group(ctx.model, average, stateful={"outer_compression": average}, compresses=True)


MODES: dict[str, Callable[[SyncContext], Group]] = {"ddp": _ddp, "diloco": _diloco}


def in_group(ctx: SyncContext) -> Group:
    """How this job's ranks keep together; a process alone has no one to keep up with."""
    if ctx.cfg.train.sharding == "fsdp" or ctx.launch.world_size <= 1:
        return _alone(ctx)  # sharded: FSDP reduces the gradients itself, every inner step
    return MODES[ctx.cfg.train.sync](ctx)


def within_job(ctx: SyncContext) -> SyncParts:
    """The outer step over this job alone: its ranks' pseudo-gradient (averaged under DiLoCo,
    the same on every rank under DDP) applied by Nesterov SGD on the anchor."""
    group = in_group(ctx)
    t = ctx.cfg.train
    outer = OuterOptimizer(list(ctx.model.parameters()), t.outer_lr, t.outer_momentum, group.reduce,
                           offload=t.outer_offload)
    return SyncParts(outer=outer, model=group.model, stateful=group.stateful, compresses=group.compresses)
