"""A run in this process on the CPU, its components not started: what the tests, the
benchmarks and a notebook drive step by step (``run.trainer.inner_step()``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from prometheus_client import CollectorRegistry

from daemon.distributed import Launch
from daemon.engine.protocols import StopSignal
from daemon.gpu import GpuProbe
from daemon.metrics import build_core_metrics
from daemon.run.build import Run, build_run
from daemon.run.catalog import CATALOG, Catalog
from daemon.state import MinerState


class NeverStop:
    """The trainer's shutdown seam, never set: the caller stops by step count."""

    requested = False

    def abandon_partial_step(self) -> bool:
        return False


class LocalRun(NamedTuple):
    run: Run
    registry: CollectorRegistry
    state: MinerState


def cpu_run(sets: Iterable[str], *, state: MinerState | None = None, registry: CollectorRegistry | None = None,
            stop: StopSignal | None = None, catalog: Catalog = CATALOG) -> LocalRun:
    """A run built by the one builder on the CPU, one process, from ``--set`` strings only (no
    file, no environment), its metrics on ``registry`` (a new one by default)."""
    cfg = catalog.load(sets=list(sets), environ={})
    state = state if state is not None else MinerState(task=cfg.train.task)
    registry = registry if registry is not None else CollectorRegistry()
    metrics = build_core_metrics(registry, state, GpuProbe())
    run = build_run(cfg, state, metrics, registry, stop or NeverStop(), Launch(), torch.device("cpu"),
                    catalog=catalog)
    return LocalRun(run, registry, state)
