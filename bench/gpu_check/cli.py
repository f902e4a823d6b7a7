"""The command line: parse, decide GPU or rehearsal, run the checks, print the table, exit."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from bench.gpu_check.checks import Ctx, run_checks
from bench.gpu_check.plan import GPU, REHEARSAL
from bench.gpu_check.procs import children
from bench.gpu_check.table import Row, counts, exit_code, render

NO_CUDA_LINE = "gpu_check: no CUDA device; nothing to check (use --cpu-rehearsal to test the script)"
EXIT_NO_CUDA = 2
BUDGET_SECONDS = 420  # the checks' share of the 8 minutes; stopping what still runs takes the rest


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check",
                                     description="Check minerd's CUDA paths on a GPU machine; one table, exit 1 on "
                                     "a failed check, 2 without CUDA.")
    parser.add_argument("--cpu-rehearsal", action="store_true",
                        help="run the same checks on the CPU (tiny preset, gloo); CUDA-only facts SKIP")
    parser.add_argument("--out", type=Path, default=None,
                        help="keep every run's logs here (default: a temporary folder, removed when all passed)")
    parser.add_argument("--budget", type=float, default=BUDGET_SECONDS,
                        help=f"seconds the checks may take together (default {BUDGET_SECONDS})")
    return parser.parse_args(argv)


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # systemd, a CI runner or `timeout` sends SIGTERM: unwind, so that every started process is stopped.
    raise SystemExit(128 + signum)


def run(argv: list[str]) -> tuple[int, list[Row]]:
    args = parse(argv)
    import torch  # after parsing: --help needs no torch

    if not args.cpu_rehearsal and not torch.cuda.is_available():
        print(NO_CUDA_LINE, flush=True)
        return EXIT_NO_CUDA, []
    plan = REHEARSAL if args.cpu_rehearsal else GPU
    out = args.out.resolve() if args.out else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if plan.threads:
        env["OMP_NUM_THREADS"] = str(plan.threads)
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    t0 = time.monotonic()
    try:
        with children() as kids:
            ctx = Ctx(plan, out, kids, deadline=t0 + args.budget, env=env)
            ctx.progress(f"{'CPU rehearsal' if args.cpu_rehearsal else 'CUDA'}; logs in {out}")
            rows = run_checks(ctx)
    finally:
        signal.signal(signal.SIGTERM, previous)
    code = exit_code(rows)
    facts = ctx.facts
    mode = "CPU rehearsal" if args.cpu_rehearsal else "CUDA"
    print(f"\ngpu_check ({mode}): {facts.get('device_name', '?')}, torch {facts.get('torch', torch.__version__)}"
          f", CUDA {facts.get('cuda') or 'none'}, {time.monotonic() - t0:.0f} s\n")
    print(render(rows))
    n = counts(rows)
    (out / "results.json").write_text(json.dumps(
        {"mode": mode, "facts": facts, "exit_code": code, "rows": [r.as_dict() for r in rows]}, indent=2))
    kept = args.out is not None or code != 0
    where = f"logs in {out}" if kept else "logs removed"
    print(f"\ngpu_check: {n['PASS']} passed, {n['FAIL']} failed, {n['SKIP']} skipped; {where}", flush=True)
    if not kept:
        shutil.rmtree(out, ignore_errors=True)
    return code, rows


def main(argv: list[str] | None = None) -> int:
    return run(sys.argv[1:] if argv is None else argv)[0]
