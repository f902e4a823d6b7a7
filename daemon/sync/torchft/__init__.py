"""Fault-tolerant outer synchronisation across replica groups, on torchft (``outer.py``):
each machine (or torchrun job) is a replica group; its outer steps go through a quorum the
lighthouse forms of the groups alive, and a (re)started group recovers from a live one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.config import Config, problem
from daemon.plugin.entries import SyncEntry
from daemon.sync.torchft.config import FtConfig
from daemon.sync.torchft.tokens import token_problem

if TYPE_CHECKING:
    from daemon.plugin.parts import SyncContext, SyncParts


def selects(cfg: Config, world_size: int) -> bool:
    return FtConfig.of(cfg).enabled


def replica(cfg: Config) -> int:
    return FtConfig.of(cfg).replica_group


def validate(cfg: Config, world_size: int) -> list[str]:
    ft, t = FtConfig.of(cfg), cfg.train
    out = []
    if why := token_problem(ft.token_file):
        out.append(problem("ft.token_file", why, ft.token_file))
    if not ft.lighthouse:
        out.append(problem("ft.lighthouse", "is required with ft.enabled (http://host:port of torchft_lighthouse)",
                           ft.lighthouse))
    if t.outer_compression != "none":
        out.append(problem("train.outer_compression", "is not used across replica groups yet; set none with "
                           "ft.enabled", t.outer_compression))
    stall = cfg.watchdog.stall_seconds
    if cfg.watchdog.exit_on_stall and ft.quorum_timeout_seconds >= stall:
        # Waiting for a quorum is not progress: the watchdog would end the miner mid-wait.
        out.append(problem("ft.quorum_timeout_seconds", f"must be under watchdog.stall_seconds ({stall:g})",
                           ft.quorum_timeout_seconds))
    return out


def build(ctx: SyncContext) -> SyncParts:
    from daemon.sync.torchft.build import build as build_ft

    return build_ft(ctx)


ENTRY = SyncEntry(
    name="torchft",
    summary="across replica groups that come and go (torchft: a lighthouse, a quorum per outer step, recovery)",
    sections=(FtConfig,),
    selects=selects,
    replica=replica,
    validate=validate,
    build=build,
)
