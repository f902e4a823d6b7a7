"""No outer sync: the outer step applies this job's own pseudo-gradient.

A process alone, or a torchrun job under DDP (whose ranks already agree): the outer step
is Nesterov SGD on the anchor with the job's own pseudo-gradient, as in DiLoCo with one
worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.config import Config
from daemon.plugin.entries import SyncEntry

if TYPE_CHECKING:
    from daemon.plugin.parts import SyncContext, SyncParts


def build(ctx: SyncContext) -> SyncParts:
    from daemon.sync.group import within_job

    return within_job(ctx)


def selects(cfg: Config, world_size: int) -> bool:
    return True  # the last resort: asked last, it takes whatever no other outer sync did


ENTRY = SyncEntry(
    name="none",
    summary="the outer step applies this job's own pseudo-gradient (one process, or DDP under torchrun)",
    selects=selects,
    build=build,
)
