"""The task registry: the jobs ``train.task`` can name.

A task is a folder here whose ``__init__`` defines an ``ENTRY`` (``entry.py``) and one
line below. The engine never names a task: it runs whatever ``ENTRY.build`` returns.
"""

from __future__ import annotations

from daemon.tasks import causal_lm, twotower
from daemon.tasks.entry import TaskEntry

TASKS: dict[str, TaskEntry] = {entry.name: entry for entry in (causal_lm.ENTRY, twotower.ENTRY)}

__all__ = ["TASKS", "TaskEntry"]
