"""code_corpus: how long the two-tower task's default corpus takes to extract, the cost of its
first start.

The (docstring, function) pairs of this machine's Python sources (the standard library and
the installed packages; the standard library alone with ``--quick``), extracted three ways in
this process, in turn:

- baseline: one process, every node of every syntax tree visited (``ast.walk``) and the
  cyclic garbage collector on, as the corpus was first extracted;
- one_process: one process, only statements visited, the collector paused (a machine with one
  core);
- default: what ``code_pairs`` does, worker processes (one per core, up to eight).

Each must give the very same pairs, in the same order.

- one_process_speedup, default_speedup: the baseline's time over each (goal: default >= 2
  on 2 cores);
- files, pairs: report.
"""

from __future__ import annotations

import ast
import gc
import time
from collections.abc import Callable
from pathlib import Path

from bench._common import result


def _timed(fn: Callable[[], list[object]]) -> tuple[float, list[object]]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(quick: bool) -> None:
    from daemon.data.pairs import code
    from daemon.data.text.corpus import stdlib_root

    roots: list[Path] | None = [stdlib_root()] if quick else None
    files = len(code.code_sources(roots))
    real_functions_in, real_workers, real_disable = code.functions_in, code._workers, gc.disable

    def baseline() -> list[object]:
        code.functions_in = lambda tree: [n for n in ast.walk(tree) if isinstance(n, code._FUNCTIONS)]
        code._workers = lambda groups: 1
        gc.disable = lambda: None  # the collector stays on
        try:
            return list(code.code_pairs(roots))
        finally:
            code.functions_in, code._workers, gc.disable = real_functions_in, real_workers, real_disable

    def one_process() -> list[object]:
        code._workers = lambda groups: 1
        try:
            return list(code.code_pairs(roots))
        finally:
            code._workers = real_workers

    def default() -> list[object]:
        return list(code.code_pairs(roots))

    t_base, base = _timed(baseline)
    t_one, one = _timed(one_process)
    t_default, out = _timed(default)
    assert gc.isenabled()
    if not base == one == out:
        raise SystemExit("code_corpus: the three ways gave different pairs")
    workers = code._workers(files // code._GROUP + 1)
    print(f"{'run':<28}{'seconds':>10}{'speedup':>10}")
    print(f"{'baseline (ast.walk, gc on)':<28}{t_base:>10.1f}{1.0:>10.2f}")
    print(f"{'one process':<28}{t_one:>10.1f}{t_base / t_one:>10.2f}")
    print(f"{f'default ({workers} workers)':<28}{t_default:>10.1f}{t_base / t_default:>10.2f}")
    result("code_corpus", one_process_speedup=t_base / t_one, default_speedup=t_base / t_default,
           files=files, pairs=len(out))
