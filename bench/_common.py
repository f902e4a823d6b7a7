"""Helpers shared by the benchmarks: interleaved timing, the RESULT line, a miner run to its end.

A run in this process is ``daemon.run.local.cpu_run``, as in the tests."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.logsetup import json_records


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
    return json_records(out.stdout + out.stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
