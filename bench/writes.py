"""writes: bytes the default jobs write to disk per second, as the kernel counts them.

Each job runs as `minerd run` does for a user (its defaults, its own state directory in
/tmp, the API off) in a subprocess; from its first inner step on, the bench reads
``write_bytes`` of /proc/<pid>/io at the start and end of a window (240 s; 60 s with
``--quick``), so start-up work (the corpus and token caches) is left out and every
checkpoint, revision and embedding sync of the window is in. Goal: at most 20 MB/s each.

- mb_per_s_default: the default job (the tiny language model on the standard library).
- mb_per_s_twotower: `--set train.task=twotower`, its defaults (mining, ID embeddings).
- mb_per_s_twotower_10s: the same with a checkpoint every 10 s (`checkpoint.every_inner_steps=100`,
  `checkpoint.min_interval_seconds=10`): what an operator who wants to lose less at a kill
  sets. The ID-embedding table changes by a few rows a step, so most of its checkpoints hold
  only the rows changed since a whole one; at the default minute a checkpoint finds more than
  a quarter of the rows changed and writes the table whole.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import result
from daemon.logsetup import json_records

ROOT = Path(__file__).resolve().parent.parent


def _write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"no write_bytes in /proc/{pid}/io")


def measure(sets: list[str], seconds: float) -> tuple[float, int, int, list[int]]:
    """(MB/s over the window, checkpoints written, revisions published, each checkpoint's
    size in MB) for one job."""
    state = Path(tempfile.mkdtemp(prefix="bench-writes-"))
    args = [sys.executable, "-m", "daemon", "run", "--set", f"paths.state_dir={state}", "--set", "api.enabled=false",
            "--set", "telemetry.log_format=json"]
    for s in sets:
        args += ["--set", s]
    log = state.parent / f"{state.name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + 600
            while "Outer Step:" not in log.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the job did not start:\n{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.5)
            before = _write_bytes(proc.pid)
            time.sleep(seconds)
            written = _write_bytes(proc.pid) - before
        finally:
            proc.send_signal(2)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    text = log.read_text(errors="replace")
    sizes = [round(e["bytes"] / 1e6) for e in json_records(text) if e.get("event") == "checkpoint saved"]
    return written / seconds / 1e6, len(sizes), text.count("UPLOAD OK:"), sizes


def main(quick: bool) -> None:
    seconds = 60.0 if quick else 240.0
    rows = {}
    frequent = ["train.task=twotower", "twotower.corpus=synthetic", "checkpoint.every_inner_steps=100",
                "checkpoint.min_interval_seconds=10"]
    for name, sets in (("default", []), ("twotower", ["train.task=twotower", "twotower.corpus=synthetic"]),
                       ("twotower_10s", frequent)):
        rows[name] = measure(sets, seconds)
    print(f"{'job':<14}{'MB/s':>8}{'checkpoints':>13}{'revisions':>11}   (window {seconds:.0f} s)  checkpoint MB")
    for name, (mbps, ckpts, revs, sizes) in rows.items():
        print(f"{name:<14}{mbps:>8.2f}{ckpts:>13}{revs:>11}   {sizes}")
    result("writes", mb_per_s_default=rows["default"][0], mb_per_s_twotower=rows["twotower"][0],
           mb_per_s_twotower_10s=rows["twotower_10s"][0])
