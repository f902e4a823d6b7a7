"""The exchange's builders: a miner's outer sync, and what the aggregator scores with."""

from __future__ import annotations

from typing import Any

from daemon.compression import CodecSpec
from daemon.config import Config
from daemon.plugin.parts import SyncContext, SyncParts
from daemon.storage import Storage, open_storage
from daemon.sync.exchange.config import ExchangeConfig
from daemon.sync.exchange.layout import applicability
from daemon.sync.exchange.metrics import ExchangeCollector
from daemon.sync.exchange.miner import ExchangeMiner
from daemon.sync.exchange.weights import shapes


def storage_of(ex: ExchangeConfig) -> Storage:
    return open_storage(ex.target, ex.endpoint_url)


def codec_of(cfg: Config) -> CodecSpec:
    cc = cfg.compression
    return CodecSpec.of(cfg.upload.compression, cc.block, cc.keep, cc.quantize)


def digest_of(cfg: Config, model: Any, data_record: Any) -> str:
    dataset = data_record(0).get("dataset") if data_record is not None else None
    return applicability(cfg.train.task, shapes(model), dataset)


def build_miner(ctx: SyncContext) -> SyncParts:
    ex = ExchangeConfig.of(ctx.cfg)
    miner = ExchangeMiner(ex, storage_of(ex), ctx.model, codec_of(ctx.cfg),
                          digest_of(ctx.cfg, ctx.model, ctx.data_record),
                          ex.inner_steps(ctx.cfg.train.inner_steps_per_outer), ctx.state, ctx.data_record,
                          ctx.held_out_loss)
    ctx.registry.register(ExchangeCollector(miner))
    return SyncParts(outer=miner, model=ctx.model, join=miner, sections={"exchange": miner.status})
