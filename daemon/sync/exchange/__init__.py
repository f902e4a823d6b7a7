"""Training together through a bucket (``exchange``): miners submit each round's compressed
pseudo-gradient to a shared target, an aggregator (``minerd aggregate``) scores and applies
them and publishes the next global model, which every miner follows. No network between
miners: a directory (a shared mount) or S3/R2 is all they share."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from daemon.config import Config, problem
from daemon.plugin.entries import SyncEntry
from daemon.sync.exchange.config import ExchangeConfig

if TYPE_CHECKING:
    from daemon.plugin.parts import SyncContext, SyncParts


def selects(cfg: Config, world_size: int) -> bool:
    return ExchangeConfig.of(cfg).enabled


def replica(cfg: Config) -> int:
    """The miner id as a number: it keys this miner's data order."""
    name = ExchangeConfig.of(cfg).miner_id
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 1_000_000


def validate(cfg: Config, world_size: int) -> list[str]:
    ex, out = ExchangeConfig.of(cfg), []
    if not ex.target:
        out.append(problem("exchange.target", "is required with exchange.enabled (a directory or s3://bucket/prefix)",
                           ex.target))
    if not ex.miner_id:
        out.append(problem("exchange.miner_id", "is required with exchange.enabled", ex.miner_id))
    if cfg.train.task != "causal_lm":
        out.append(problem("exchange.enabled", "needs train.task=causal_lm (submissions are scored by held-out "
                           "loss)", cfg.train.task))
    if ex.round_inner_steps and ex.round_inner_steps != cfg.train.inner_steps_per_outer:
        out.append(problem("exchange.round_inner_steps", "must equal train.inner_steps_per_outer (a round is one "
                           f"outer step; got {cfg.train.inner_steps_per_outer})", ex.round_inner_steps))
    if cfg.upload.compression == "none":
        out.append(problem("upload.compression", "must name a codec with exchange.enabled (submissions are "
                           "compressed pseudo-gradients)", cfg.upload.compression))
    if world_size > 1:
        out.append(problem("exchange.enabled", "runs one process per miner for now (not under torchrun)", world_size))
    return out


def build(ctx: SyncContext) -> SyncParts:
    from daemon.sync.exchange.build import build_miner

    return build_miner(ctx)


ENTRY = SyncEntry(
    name="exchange",
    summary="rounds through a bucket: submissions scored and applied by an aggregator (minerd aggregate)",
    sections=(ExchangeConfig,),
    selects=selects,
    replica=replica,
    validate=validate,
    build=build,
)
