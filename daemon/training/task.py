"""What the engine needs from a task: a model, batches, a loss, an evaluation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class EvalResult:
    metrics: dict[str, float]
    line: str  # the log line operators grep for
    separation_margin: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    name: str

    @property
    def num_items(self) -> int: ...

    def build_model(self) -> nn.Module: ...

    def get_batch(self, idx: torch.Tensor, device: torch.device) -> Any:
        """Gather one micro-batch with one index operation and move it to ``device``."""

    def loss(self, model: nn.Module, batch: Any, step: int) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, device: torch.device, epoch: int, beat: Callable[[], None]) -> EvalResult:
        """Held-out evaluation; calls ``beat`` as it makes progress."""
