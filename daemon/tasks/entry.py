"""What a task registers: its name, its builder, its config defaults and checks.

An entry is cheap to import (no torch, no transformers): ``minerd config validate``
reads the defaults and runs the checks without loading a model library. The
builder imports the task's heavy modules when a run is really assembled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from daemon.config import Config
    from daemon.training.task import BuildContext, TaskParts


def _no_problems(cfg: Config, world_size: int) -> list[str]:
    return []


@dataclass(frozen=True)
class TaskEntry:
    name: str
    summary: str
    # Everything the run needs from this task, finished (see daemon/training/task.py).
    build: Callable[[BuildContext], TaskParts]
    # The task's model as configured, for `minerd diagnose` (no data read, nothing written).
    diagnose_model: Callable[[Config, torch.device], nn.Module]
    # Dotted config keys this task sets when no source (file, env, --set) set them.
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # Problems as `config error:` lines; may read (never write) the file system.
    validate: Callable[[Config, int], list[str]] = _no_problems
