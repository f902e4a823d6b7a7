"""`python -m bench [NAME ...] [--quick]`: run benchmarks, print a table of ratios.

Each benchmark is a module ``bench/<name>.py`` with ``main(quick: bool)``; it
prints its own table and, last, ``RESULT <name> key=value ...``. Every
benchmark runs in its own process so one's threads and caches cannot skew
another's; ratios are measured inside one process against a baseline run
there too, because absolute times drift 2x on these shared machines.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["sampler", "telemetry", "api", "mining", "embeddings", "upload", "distributed", "compression",
         "faulttolerance", "lm", "writes", "data", "exchange", "fsdp", "code_corpus", "retrieval", "retrieval_scale"]


# Not a benchmark: the checks of a GPU machine (`make gpu-check`), which say nothing without one.
NOT_BENCHMARKS = {"gpu_check"}


def available() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules([str(HERE)])
             if not m.name.startswith("_") and m.name not in NOT_BENCHMARKS}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def run_one(name: str, quick: bool) -> int:
    module = importlib.import_module(f"bench.{name}")
    module.main(quick)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {available()})")
    parser.add_argument("--quick", action="store_true", help="shorter runs (each under 2 minutes)")
    parser.add_argument("--curve", action="store_true", help="lm only: draw the 10-minute held-out loss curve")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = args.names or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"bench: unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(available())}", file=sys.stderr)
        return 2
    if args.in_process:
        return run_one(names[0], args.quick)
    results: list[tuple[str, str, float]] = []
    failed = []
    for name in names:
        cmd = [sys.executable, "-m", "bench", name, "--in-process"] + (["--quick"] if args.quick else [])
        cmd += ["--curve"] if args.curve else []
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True)
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr[-4000:] if proc.returncode else "")
        lines = [x for x in proc.stdout.splitlines() if x.startswith(f"RESULT {name} ")]
        if proc.returncode or not lines:
            failed.append(name)
            continue
        results.append((name, lines[-1][len(f"RESULT {name} ") :], time.monotonic() - t0))
    print("\n| benchmark | results | seconds |\n|---|---|---|")
    for name, kv, secs in results:
        print(f"| {name} | {kv} | {secs:.0f} |")
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
