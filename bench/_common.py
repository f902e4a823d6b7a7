"""Helpers shared by the benchmarks: interleaved timing, the RESULT line, a CPU trainer."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from daemon.config import load_config
from daemon.distributed import Launch
from daemon.gpu import GpuProbe
from daemon.metrics import build_core_metrics
from daemon.state import MinerState
from daemon.training.build import Run, build_run


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time of ``repeats`` calls: the least disturbed run on a noisy machine."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def interleaved(a: Callable[[], object], b: Callable[[], object], rounds: int) -> tuple[float, float]:
    """Median times of a and b measured in alternation, so drift hits both alike.

    The order flips every round (a b, b a, a b, ...): with a fixed order, a
    process still warming up (allocator, caches, CPU clocks) favours whichever
    always runs second.
    """
    ta: list[float] = []
    tb: list[float] = []
    for r in range(rounds):
        pair = ((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta))
        for fn, sink in pair:
            t0 = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def result(name: str, **values: float) -> None:
    kv = " ".join(f"{k}={v:.4g}" for k, v in values.items())
    print(f"RESULT {name} {kv}", flush=True)


class _NoStop:
    """The trainer's shutdown seam, never set: a benchmark stops by step count."""

    requested = False

    def abandon_partial_step(self) -> bool:
        return False


def cpu_run(
    sets: list[str], state: Any = None, registry: Any = None, stop: Any = None
) -> tuple[Run, MinerState, CollectorRegistry]:
    """The real run on the CPU, one process, configured by ``--set`` strings only (no
    file, no environment), with its metrics on ``registry`` (a new one by default).
    Its components are not started: a benchmark drives the trainer's steps itself."""
    cfg = load_config(sets=sets, environ={})
    state = state if state is not None else MinerState(task=cfg.train.task)
    registry = registry if registry is not None else CollectorRegistry()
    metrics = build_core_metrics(registry, state, GpuProbe())
    run = build_run(cfg, state, metrics, registry, stop or _NoStop(), Launch(), torch.device("cpu"))
    return run, state, registry
