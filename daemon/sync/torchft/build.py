"""The torchft outer sync's builder: the outer step, its metrics and its /status section."""

from __future__ import annotations

import os

from daemon.config import ConfigError
from daemon.plugin.parts import SyncContext, SyncParts
from daemon.sync.group import in_group
from daemon.sync.torchft.config import FtConfig


def build(ctx: SyncContext) -> SyncParts:
    """The outer step across replica groups; inside a torchrun group the ranks keep together
    first (DDP, or the pseudo-gradient averaged over the group: ``daemon/sync/group.py``)."""
    # torchft's compiled part logs every quorum and commit at info to stderr, outside structlog;
    # read once, when it is first imported. minerd's own outer-step line carries the same facts.
    os.environ.setdefault("RUST_LOG", "warn")
    try:
        import torchft  # noqa: F401  (an optional dependency: the `ft` extra)
    except ImportError:
        raise ConfigError(["config error: ft.enabled: torchft is not installed (pip install 'minerd[ft]', "
                           "or make setup)"]) from None
    from daemon.sync.torchft.outer import FtOuterOptimizer
    from daemon.sync.torchft.stats import FtStats
    from daemon.sync.torchft.stats import register as register_ft

    ft = FtConfig.of(ctx.cfg)
    stats = FtStats(ft.lighthouse, ft.replica_group)
    register_ft(ctx.registry, stats)
    group = in_group(ctx)
    outer = FtOuterOptimizer(list(ctx.model.parameters()), ctx.cfg, ctx.state, stats, group.reduce)
    # A component too: stopped last-in first-out, which releases its manager.
    return SyncParts(outer=outer, model=group.model, join=outer, stateful=group.stateful, components=[outer],
                     sections={"ft": stats.status}, compresses=group.compresses)
