"""Helpers shared by the benchmarks: interleaved timing and the RESULT line."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


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
    ta, tb = [], []
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
