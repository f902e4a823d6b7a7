"""The cores this process may run on: what thread and worker counts are sized by. No torch here,
so worker processes that import it start fast."""

from __future__ import annotations

import os


def machine_cores() -> int:
    """The cores this process may use (its CPU affinity where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
