"""What the engine and the parts it runs say to each other.

The engine (``trainer.py``) runs any task through :class:`Task`, offers each inner step
to :class:`StepHook` objects with a :class:`StepContext` (a narrow view, never the
trainer), checkpoints :class:`Stateful` parts, and calls an :class:`OuterStep` every
``train.inner_steps_per_outer`` inner steps; an outer sync whose replicas come and go
also implements :class:`GroupJoin`. Tasks, outer syncs and the composition root import
these protocols; none of them imports the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from daemon.distributed import CommCounter


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


class Sampler(Protocol):
    """Which items each micro-batch of an epoch holds, on this rank."""

    @property
    def batches_per_epoch(self) -> int: ...

    def batch(self, epoch: int, index: int) -> torch.Tensor:
        """Item indices of this rank's share of batch ``index`` of ``epoch`` (epochs from 1)."""


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


@dataclass(frozen=True)
class StepContext:
    """What a step hook may know of the inner step around it: a snapshot, never the trainer.

    The counters are those after the step (before it, for ``before_inner_step``); the model,
    optimizer and anchor are the live objects, to read or to update in place.
    """

    outer_step: int
    inner_step: int
    global_step: int
    epoch: int
    lr: float
    loss: float | None  # this inner step's loss; None before it ran
    grad_scale: float  # the fp16 loss scale the gradients still carry; 1.0 without one
    device: torch.device
    model: nn.Module  # the model as trained, never a DDP wrapper
    optimizer: torch.optim.Optimizer
    anchor: Sequence[torch.Tensor]  # the parameters at the last outer step (the pseudo-gradient's base)
    comm: CommCounter  # bytes sent between ranks; a hook that talks across ranks adds its own


class StepHook(Protocol):
    """A part that acts around each inner step (uploads, mining, embeddings).

    ``before_inner_step`` runs before the first micro-batch of every inner step;
    ``after_inner_step`` only after an inner step whose update was applied (not
    after a skipped non-finite one).
    """

    def before_inner_step(self, step: StepContext) -> None: ...

    def after_inner_step(self, step: StepContext) -> None: ...


class Stateful(Protocol):
    """A part whose state is part of the checkpoint (the embedding store)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StopSignal(Protocol):
    @property
    def requested(self) -> bool: ...

    def abandon_partial_step(self) -> bool:
        """True once finishing the current inner step would break the shutdown deadline."""


class OuterStep(Protocol):
    """Every ``train.inner_steps_per_outer`` inner steps: the pseudo-gradient (anchor minus
    parameters) is reduced with the peers the outer sync has and applied to the anchor."""

    anchor: list[torch.Tensor]

    def step(self) -> dict[str, Any] | None:
        """Apply one outer step; returns what the ``outer step applied`` line reports. With
        ``committed: False`` nothing was applied and the round's progress stays for the next;
        None: nothing yet (the round goes on, and the trainer asks again after the next inner
        step: an outer sync that waits for others without stopping training)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StateExchange(Protocol):
    """The whole training state, to hand to a recovering peer or to take from a live one."""

    def save(self) -> dict[str, Any]: ...

    def load(self, state: dict[str, Any]) -> None: ...


class GroupJoin(Protocol):
    """An outer sync with a group to join before the first inner step (replicas that come and go)."""

    def join(self, stop: StopSignal, state: StateExchange) -> dict[str, Any] | None:
        """Get in step with the group, taking a live peer's state when behind; returns the
        join's outer-step report, or None when a stop came first."""
