"""What a part's builder is given and what it hands back.

A task's builder gets a :class:`BuildContext` and the data its data source made, and
returns :class:`TaskParts`: everything the run needs from the task, finished (the model
on its device, the sampler, the step hooks and stateful parts it plugs in, the
components to start, how its evaluation is exported and how an upload revision is laid
out). An outer sync's builder gets a :class:`SyncContext` and returns
:class:`SyncParts`. Nothing is attached to the trainer afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from prometheus_client import CollectorRegistry
from torch import nn

from daemon.compression import CompressionStats
from daemon.config import Config
from daemon.disk import DiskFullReporter
from daemon.distributed import CommCounter, Launch
from daemon.engine.protocols import GroupJoin, OuterStep, Sampler, Stateful, StepHook, Task
from daemon.engine.sampler import EpochSampler
from daemon.state import MinerState
from daemon.upload.layout import RevisionLayout


class Component(Protocol):
    """A part with a life of its own (a thread, a server, open files): started in order after
    the model exists, stopped in reverse."""

    name: str

    def start(self) -> None: ...

    def stop(self, timeout: float) -> object: ...


# Eval metric key -> (Prometheus gauge name, help text).
EvalGauges = dict[str, tuple[str, str]]
# A /status section: read at request time.
StatusSection = Callable[[], dict[str, Any]]


@dataclass(frozen=True)
class BuildContext:
    """What a task's or data source's builder may use: the config, where it runs, the run's
    registry, and which replica of the job this process trains for."""

    cfg: Config
    state: MinerState
    registry: CollectorRegistry
    launch: Launch
    device: torch.device
    on_disk_full: DiskFullReporter = field(default_factory=DiskFullReporter)
    replica: int = 0  # the replica group (torchft), 0 for a job alone

    def sampler(self, num_items: int) -> EpochSampler:
        t = self.cfg.train
        # Replica groups each shuffle in their own order: averaging the updates of groups that
        # trained the same batches would be one group's work counted several times.
        seed = t.seed + 7919 * self.replica
        return EpochSampler(num_items, t.batch_size, seed, self.launch.rank, self.launch.world_size, t.drop_last)


@dataclass
class TaskParts:
    task: Task
    model: nn.Module  # on the run's device, not wrapped (the outer sync wraps it for DDP)
    sampler: Sampler
    layout: RevisionLayout  # the files of an upload revision
    eval_gauges: EvalGauges
    hooks: list[StepHook] = field(default_factory=list)
    stateful: dict[str, Stateful] = field(default_factory=dict)
    # Started in this order after the model exists, stopped in reverse.
    components: list[Component] = field(default_factory=list)
    sections: dict[str, StatusSection] = field(default_factory=dict)  # of /status
    tokens_per_sample: int | None = None  # tokens/s accounting (language models)
    flops_per_token: float | None = None  # training FLOPs per token, for MFU
    # What a revision published at a global step was trained on, for its manifest's "data".
    data_record: Callable[[int], dict[str, Any]] | None = None
    # The model's repeated blocks (a Llama's decoder layers): what is sharded, checkpointed and
    # compiled one by one (train.sharding, train.activation_checkpointing, train.compile).
    blocks: list[nn.Module] = field(default_factory=list)


@dataclass(frozen=True)
class SyncContext:
    """What an outer sync's builder may use: the finished model, and the counters the run
    keeps of what goes over the network and through the codec."""

    cfg: Config
    state: MinerState
    registry: CollectorRegistry
    launch: Launch
    device: torch.device
    model: nn.Module  # the task's model, on its device, rank 0's weights on every rank
    comm: CommCounter
    compression: CompressionStats
    # What the task trains on at a global step (its manifest record), when it can say.
    data_record: Callable[[int], dict[str, Any]] | None = None
    # The task's held-out loss of a model (its evaluation's "loss"), when it reports one.
    held_out_loss: Callable[[nn.Module], float] | None = None


@dataclass
class SyncParts:
    outer: OuterStep
    model: nn.Module  # the model as the trainer calls it (a DDP wrapper, or the model itself)
    join: GroupJoin | None = None  # a group to join before the first inner step
    stateful: dict[str, Stateful] = field(default_factory=dict)
    compresses: bool = False  # it reports to the run's CompressionStats (its metrics are then served)
    components: list[Component] = field(default_factory=list)
    sections: dict[str, StatusSection] = field(default_factory=dict)
