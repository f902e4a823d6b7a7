"""Helpers shared by the benchmarks: interleaved timing, the RESULT line, a CPU trainer."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
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


ROOT = Path(__file__).resolve().parent.parent


def minerd_events(sets: list[str], world: int, what: str, timeout: float = 1800) -> list[dict[str, Any]]:
    """Run ``minerd run`` (under torchrun with ``world`` > 1 processes, one thread each) to its
    end and return every JSON log line of every rank; a failed run ends the benchmark."""
    cmd = [sys.executable, "-m", "daemon", "run"]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "daemon", "run"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode:
        raise SystemExit(f"bench: the {what} run failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    return json_lines(out.stdout + out.stderr)


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON log lines in ``text`` (torchrun may prefix a rank's lines)."""
    events = []
    for line in text.splitlines():
        start = line.find("{")
        if start >= 0:
            try:
                events.append(json.loads(line[start:]))
            except ValueError:
                continue
    return events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
