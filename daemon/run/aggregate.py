"""``minerd aggregate``: the bucket exchange's aggregator, built from the same config file as
the miners (the task, its data and model; the exchange section's target and rounds)."""

from __future__ import annotations

from typing import Any

import structlog
import torch
from prometheus_client import CollectorRegistry, Gauge

from api.app import create_app
from api.server import ApiServer
from daemon import __version__
from daemon.config import Config, ConfigError
from daemon.distributed import Launch
from daemon.errors import CorruptState, DataUnreachable
from daemon.logsetup import configure_logging
from daemon.plugin.parts import BuildContext
from daemon.run.catalog import CATALOG
from daemon.run.lifecycle import Lifecycle
from daemon.run.machine import configure_threads, resolve_device
from daemon.signals import Shutdown
from daemon.state import MinerState
from daemon.storage import StorageError
from daemon.sync.exchange.aggregator import Aggregator
from daemon.sync.exchange.aggregator_metrics import AggregatorCollector
from daemon.sync.exchange.build import digest_of, storage_of
from daemon.sync.exchange.config import ExchangeConfig
from daemon.sync.exchange.layout import Refused

log = structlog.get_logger("minerd.exchange")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def build_aggregator(cfg: Config, state: MinerState, device: torch.device) -> Aggregator:
    ex = ExchangeConfig.of(cfg)
    launch = Launch(rank=0, world_size=1, local_rank=0)
    entry = CATALOG.task_for(cfg)
    request = entry.data(cfg)
    ctx = BuildContext(cfg, state, CollectorRegistry(), launch, device)
    torch.manual_seed(cfg.train.seed)  # round 0 is the model every miner would build
    parts = entry.build(ctx, CATALOG.data[request.source].build(ctx, request.spec))
    task, model = parts.task, parts.model

    def held_out_loss(m: torch.nn.Module) -> float:
        return float(task.held_out_loss(m, device, state.beat))  # type: ignore[attr-defined]

    replayed = getattr(task, "replayed_loss", None)

    def replay(m: torch.nn.Module, record: Any) -> float | None:
        assert replayed is not None
        value = replayed(m, device, record)
        return None if value is None else float(value)

    t = cfg.train
    return Aggregator(ex, storage_of(ex), model, parts.layout, held_out_loss, digest_of(cfg, model, parts.data_record),
                      ex.inner_steps(t.inner_steps_per_outer), t.outer_lr, t.outer_momentum,
                      replay=replay if replayed is not None else None)


def run_aggregator(cfg: Config) -> int:
    configure_logging(cfg.telemetry.log_format, cfg.telemetry.log_level)
    ex = ExchangeConfig.of(cfg)
    if not ex.target:
        log.error("config error: exchange.target: the aggregator needs the exchange target (got '')")
        return EXIT_CONFIG
    shutdown = Shutdown(cfg.shutdown.deadline_seconds)
    shutdown.install()
    state = MinerState(task=cfg.train.task)
    registry = CollectorRegistry()
    life = Lifecycle()
    agg: Aggregator | None = None
    if cfg.api.enabled:  # health, /status and /metrics, as for a miner
        life.start(ApiServer(create_app(state, registry, cfg.api, cfg.watchdog), cfg.api))
    try:
        configure_threads(cfg, Launch(rank=0, world_size=1, local_rank=0))
        device = resolve_device(cfg, Launch(rank=0, world_size=1, local_rank=0))
        agg = build_aggregator(cfg, state, device)
        agg.open()
        registry.register(AggregatorCollector(agg))
        # The dashboard finds its instances by minerd_info: the aggregator is one of them.
        Gauge("minerd_info", "Build and run facts", ["version", "task", "device", "rank"], registry=registry).labels(
            __version__, cfg.train.task, str(device), "aggregator").set(1)
        state.sections["aggregator"] = agg.status
        state.phase, state.first_step_done = "training", True
        state.beat()
        log.info("aggregator running", target=agg.storage.describe(), round=agg.round,
                 round_seconds=ex.round_seconds, expected_miners=ex.expected_miners)
        agg.run(shutdown, state.beat)
    except ConfigError as exc:
        for line in exc.problems:
            log.error(line)
        return EXIT_CONFIG
    except Refused as exc:
        log.error(f"EXCHANGE REFUSED: {exc}")
        return EXIT_CONFIG
    except CorruptState as exc:
        log.error(exc.line())
        return EXIT_CONFIG
    except (StorageError, DataUnreachable) as exc:
        log.error(f"EXCHANGE UNREACHABLE: {exc}; exiting for the supervisor to start again")
        return EXIT_FAILURE
    finally:
        state.phase = "stopping"
        life.stop_all(cfg.shutdown.deadline_seconds)
        shutdown.finished()
    log.info("aggregator stopped", round=agg.round if agg is not None else None)
    return EXIT_OK
