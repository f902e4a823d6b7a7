"""What the engine needs from a task, and what a task's builder hands back.

The engine runs any task through :class:`Task`; a task's builder (registered in
``daemon/tasks``) returns :class:`TaskParts`, everything the run needs from it,
finished: the model on its device, the sampler, the step hooks and stateful parts
it plugs in, the components to start, how its evaluation is exported and how an
upload revision is laid out. Nothing is attached to the trainer afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from prometheus_client import CollectorRegistry
from torch import nn

from daemon.config import Config
from daemon.disk import DiskFullReporter
from daemon.distributed import Launch
from daemon.lifecycle import Component
from daemon.state import MinerState
from daemon.training.sampler import EpochSampler
from daemon.upload.layout import RevisionLayout

if TYPE_CHECKING:
    from daemon.training.engine import Stateful, StepHook


@dataclass(frozen=True)
class BatchPos:
    """Where a micro-batch sits: its epoch (1-based) and its index in that epoch."""

    epoch: int
    index: int


@dataclass(frozen=True)
class EvalPoint:
    """When an evaluation runs: the epoch it closes (or is in) and the global inner step."""

    epoch: int
    global_step: int


@dataclass
class EvalResult:
    metrics: dict[str, float]  # what the task measured; exported through its eval gauges
    line: str  # the log line operators grep for


class Task(Protocol):
    name: str

    @property
    def num_items(self) -> int:
        """Training items an epoch covers (documents, or packed token sequences)."""

    @property
    def eval_every_steps(self) -> int:
        """Inner steps between evaluations; 0 = at the end of each epoch."""

    def get_batch(self, idx: torch.Tensor, device: torch.device, pos: BatchPos) -> Any:
        """Gather one micro-batch with one index operation and move it to ``device``."""

    def loss(self, model: nn.Module, batch: Any, step: int) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, device: torch.device, at: EvalPoint, beat: Callable[[], None]) -> EvalResult:
        """Held-out evaluation on the main rank; calls ``beat`` as it makes progress."""


# Eval metric key -> (Prometheus gauge name, help text).
EvalGauges = dict[str, tuple[str, str]]


@dataclass
class TaskParts:
    task: Task
    model: nn.Module  # on the run's device, not wrapped (the builder wraps it for DDP)
    sampler: EpochSampler
    layout: RevisionLayout  # the files of an upload revision
    eval_gauges: EvalGauges
    hooks: list[StepHook] = field(default_factory=list)
    stateful: dict[str, Stateful] = field(default_factory=dict)
    # Started in this order after the model exists, stopped in reverse.
    components: list[Component] = field(default_factory=list)
    sections: dict[str, Callable[[], dict[str, Any]]] = field(default_factory=dict)  # of /status
    tokens_per_sample: int | None = None  # tokens/s accounting (language models)
    flops_per_token: float | None = None  # training FLOPs per token, for MFU


@dataclass(frozen=True)
class BuildContext:
    """What a task's builder may use: the config, where it runs, and the run's registry."""

    cfg: Config
    state: MinerState
    registry: CollectorRegistry
    launch: Launch
    device: torch.device
    on_disk_full: DiskFullReporter = field(default_factory=DiskFullReporter)

    def sampler(self, num_items: int) -> EpochSampler:
        t = self.cfg.train
        # Replica groups (ft) each shuffle in their own order: averaging the updates of groups
        # that trained the same batches would be one group's work counted several times.
        seed = t.seed + 7919 * self.cfg.ft.replica_group if self.cfg.ft.enabled else t.seed
        return EpochSampler(num_items, t.batch_size, seed, self.launch.rank, self.launch.world_size, t.drop_last)
