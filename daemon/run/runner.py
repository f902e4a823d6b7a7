"""``minerd run``: build, start, train, stop.

Exit codes: 0 clean stop, 1 runtime failure (the supervisor restarts us),
2 bad config, 3 stalled (raised by the watchdog thread itself).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import structlog
from prometheus_client import CollectorRegistry

from api.app import create_app
from api.server import ApiServer
from daemon import diagnostics, disk
from daemon.config import Config, ConfigError, problem
from daemon.distributed import Launch, destroy_process_group, init_process_group
from daemon.errors import CorruptState, DataUnreachable, TrainingDiverged
from daemon.gpu import GpuProbe
from daemon.logsetup import bind_process_fields, configure_logging
from daemon.metrics import build_core_metrics
from daemon.plugin.parts import Component
from daemon.run.build import Run, build_run
from daemon.run.catalog import CATALOG
from daemon.run.lifecycle import Lifecycle
from daemon.run.machine import configure_threads, resolve_device
from daemon.sdnotify import SdNotifier
from daemon.signals import Shutdown
from daemon.state import MinerState
from daemon.upload import StorageError
from daemon.watchdog import Watchdog

log = structlog.get_logger("minerd")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
# Room the start-up needs before anything is built: the tokenizer and the prepared corpus of the
# default corpus take under 20 MB; a checkpoint's own room is checked once the model exists.
MIN_FREE_TO_BUILD = 64 << 20
DATA_RETRY_SECONDS = 5.0  # between tries to reach an unreachable dataset at start
DATA_WAIT_REPEAT_SECONDS = 300.0  # the DATASET UNREACHABLE line, again while it lasts


def run(cfg: Config) -> int:
    configure_logging(cfg.telemetry.log_format, cfg.telemetry.log_level)
    launch = Launch.from_env()
    shutdown = Shutdown(cfg.shutdown.deadline_seconds)
    shutdown.install()
    state = MinerState(task=cfg.train.task, rank=launch.rank, world_size=launch.world_size,
                       local_rank=launch.local_rank)
    registry = CollectorRegistry()
    metrics = build_core_metrics(registry, state, GpuProbe())
    on_disk_full = disk.DiskFullReporter(disk.DiskMetrics(registry, cfg.state_dir))
    life = Lifecycle()
    # Under torchrun only local rank 0 talks to systemd (one READY, one watchdog).
    notifier = SdNotifier() if launch.local_rank == 0 else SdNotifier(environ={})
    trainer = None
    code = EXIT_OK
    for note in cfg.deprecations:
        log.warning(note, line=True)
    try:
        threads = configure_threads(cfg, launch)
        device = resolve_device(cfg, launch)
        state.device = str(device)
        sharded = cfg.train.sharding == "fsdp"
        if sharded and not launch.rendezvous:
            raise ConfigError([problem("train.sharding", "fsdp shards the model over the ranks of a torchrun job; "
                                       "start it with torchrun (--nproc_per_node 1 for one GPU), or set "
                                       "train.sharding=none", cfg.train.sharding)])
        if device.type == "cuda":
            # Before anything is allocated: a model that cannot fit fails here in one line, not as
            # an out-of-memory traceback minutes into the start (and again at every restart).
            from daemon import memory_plan

            why = memory_plan.refusal(memory_plan.plan(cfg, launch.world_size, CATALOG.meta_model(cfg), device))
            if why is not None:
                raise ConfigError([f"config error: {why}"])
        if launch.world_size > 1:
            bind_process_fields(rank=launch.rank)
        if launch.world_size > 1 or sharded:
            init_process_group(launch, device, cfg.train.dist_timeout_seconds, alone_too=sharded)
        log.info("minerd starting", version=state.version, pid=os.getpid(), task=cfg.train.task, device=str(device),
                 torch_threads=threads, rank=launch.rank, world_size=launch.world_size,
                 state_dir=str(cfg.state_dir))
        notifier.attach(state)
        for component in _early_components(cfg, state, registry, launch, notifier):
            life.start(component)
        built = _build_with_room(cfg, state, shutdown, launch, on_disk_full,
                                 lambda: build_run(cfg, state, metrics, registry, shutdown, launch, device,
                                                   on_disk_full=on_disk_full))
        if launch.is_main:
            _wait_for_room(cfg, state, shutdown, built.trainer.checkpoint_bytes(), "one checkpoint")
        trainer = built.trainer
        log.info("run assembled", task=cfg.train.task, data_source=built.data_source, outer_sync=built.outer_sync,
                 accumulation=built.accumulation)
        if built.sharding is not None:
            log.info(built.sharding, line=True)
        for component in built.components:  # the task's (embeddings, mining), the outer sync's, the uploader
            life.start(component)
        model = trainer.model
        diag = diagnostics.collect(cfg, next(model.parameters()).device, launch.world_size, model)
        state.diagnostics = diag.model_dump()
        for line in diagnostics.render(diag):
            # Red flags at warning level: a JSON log filtered on level must not miss them.
            emit = log.warning if line.startswith(("RED FLAG", "WARNING")) else log.info
            emit(line, line=True)
        if device.type == "cpu":
            log.warning("no GPU in use: training on the CPU", configured=cfg.train.device)
        trainer.resume()
        t_train = time.monotonic()
        start_samples = trainer.progress.samples
        reason = trainer.run()
        seconds = time.monotonic() - t_train
        done = trainer.summary()
        log.info("training stopped", reason=reason, global_step=done.progress.global_step,
                 train_seconds=round(seconds, 3), samples=done.progress.samples - start_samples,
                 comm_bytes=done.comm_bytes, **trainer.state_bytes())
    except ConfigError as exc:
        for line in exc.problems:
            log.error(line)
        code = EXIT_CONFIG
    except StorageError as exc:
        log.error(f"upload error: {exc}")
        code = EXIT_CONFIG
    except _StoppedWhileWaiting:
        log.info("stop requested while waiting for disk space or the dataset")
    except DataUnreachable as exc:
        log.error(f"DATASET UNREACHABLE: {exc}; exiting for the supervisor to start again (the start waits)")
        code = EXIT_FAILURE
    except TrainingDiverged as exc:
        log.error(f"TRAINING DIVERGED: {exc}", global_step=state.global_step)
        code = EXIT_FAILURE
    except CorruptState as exc:
        # A file on disk is broken: restarting would read it again and fail again (exit 2 is not
        # restarted by the pm2 and systemd files shipped here).
        log.error(exc.line())
        code = EXIT_CONFIG
    except Exception as exc:
        if disk.is_full(exc):  # under torchrun, writing the caches; the next start waits for room first
            on_disk_full("start-up data", cfg.state_dir, exc)
        else:
            log.exception("unrecoverable error; exiting so the supervisor restarts minerd",
                          global_step=state.global_step)
        code = EXIT_FAILURE
    finally:
        state.phase = "stopping"
        notifier.stopping(f"stopping at global step {state.global_step}")
        if trainer is not None and code == EXIT_OK:
            try:
                trainer.checkpoint("stop")
            except Exception:
                log.exception("final checkpoint failed")
                code = EXIT_FAILURE
        life.stop_all(cfg.shutdown.deadline_seconds)
        destroy_process_group(together=code == EXIT_OK)
        state.phase = "stopped"
        shutdown.finished()
    log.info("minerd stopped", exit_code=code)
    return code


class _StoppedWhileWaiting(Exception):
    pass


def _wait_for_room(cfg: Config, state: MinerState, shutdown: Shutdown, needed: int, why: str) -> None:
    """Wait, not ready and still beating (a wait is not a stall), until ``needed`` bytes are free."""

    def waiting(reason: str | None) -> None:
        state.not_ready_reason = reason
        state.beat()

    if not disk.wait_for_room(cfg.state_dir, needed, why, lambda: shutdown.requested, waiting):
        raise _StoppedWhileWaiting


def _build_with_room(
    cfg: Config, state: MinerState, shutdown: Shutdown, launch: Launch, on_disk_full: disk.DiskFullReporter,
    build: Callable[[], Run],
) -> Run:
    """Build the run once there is room for its caches (tokenizer, token file, corpus, embedding
    chunks). The caches are written before anything is registered or started, and atomically, so a
    build the disk refused is tried again, not-ready meanwhile, once more room has been freed; a
    corpus can need more than ``MIN_FREE_TO_BUILD``. Under torchrun the other ranks wait for rank 0
    in a collective with a timeout, so there the run ends (exit 1) and the next start waits."""
    needed = MIN_FREE_TO_BUILD
    said = -DATA_WAIT_REPEAT_SECONDS
    while True:
        _wait_for_room(cfg, state, shutdown, needed, "the tokenizer and data caches")
        try:
            built = build()
            state.not_ready_reason = None
            return built
        except DataUnreachable as exc:
            # A bucket that does not answer at start: wait, not ready (a restart would find it
            # down again), and try again; said again every few minutes.
            if launch.world_size > 1:
                raise
            state.not_ready_reason = f"dataset unreachable: {exc}"
            if time.monotonic() - said >= DATA_WAIT_REPEAT_SECONDS:
                said = time.monotonic()
                log.error(f"DATASET UNREACHABLE: {exc}; waiting for it (/readyz answers 503 meanwhile)")
            deadline = time.monotonic() + DATA_RETRY_SECONDS
            while time.monotonic() < deadline:
                if shutdown.requested:
                    raise _StoppedWhileWaiting from None
                state.beat()
                time.sleep(0.5)
        except OSError as exc:
            if not disk.is_full(exc) or launch.world_size > 1:
                raise
            on_disk_full("start-up data", cfg.state_dir, exc)
            # Tried again when another MIN_FREE_TO_BUILD is free beyond what was free when it failed.
            needed = (disk.free_bytes(cfg.state_dir) or 0) + MIN_FREE_TO_BUILD


def _early_components(
    cfg: Config, state: MinerState, registry: CollectorRegistry, launch: Launch, notifier: SdNotifier
) -> list[Component]:
    """Components that run before the model exists: the API answers during start-up
    (readiness 503) and is stopped last; the watchdog watches start-up too."""
    comps: list[Component] = [notifier]
    if cfg.api.enabled:
        app = create_app(state, registry, cfg.api, cfg.watchdog)
        comps.append(ApiServer(app, cfg.api, port_offset=launch.local_rank))
    comps.append(Watchdog(state, cfg.watchdog))
    return comps
