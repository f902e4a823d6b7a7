"""DiLoCo over the ranks of one torchrun job: each rank trains alone between outer
steps, then the pseudo-gradients are averaged (dense, or compressed with
``train.outer_compression``) and applied by every rank alike."""

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
    return world_size > 1 and cfg.train.sync == "diloco"


ENTRY = SyncEntry(
    name="diloco",
    summary="DiLoCo over this torchrun job's ranks: pseudo-gradients averaged at each outer step",
    selects=selects,
    build=build,
)
