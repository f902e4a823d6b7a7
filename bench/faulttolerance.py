"""faulttolerance: replica groups through torchft when one dies, and what the quorum costs.

Three replica groups (one `minerd run` each, CPU, the small two-tower job of the
distributed benchmark) and a lighthouse on localhost. One replica is killed with
SIGKILL; the survivors train on for ``outage`` seconds; the killed one is restarted
from its state directory.

- survivor_restarts: processes of the surviving replicas that ended (goal 0).
- steps_during_outage: outer steps both survivors committed while the third was dead
  (goal >= 3; the fewer of the two).
- rejoin_seconds: from the restart to its first outer step with the others (process
  start, connecting, recovering the group's state from a live peer).
- outer_sync_over_torchrun: median seconds of an outer sync (quorum, all-reduce,
  commit) of three healthy replicas through torchft, over the dense all-reduce of the
  same job as three torchrun ranks.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench._common import ROOT, free_port, minerd_events, result
from bench.distributed import COMMON
from daemon.logsetup import json_records

INNER = 10


def _committed(log: Path) -> list[dict]:
    text = log.read_text(errors="replace")
    return [e for e in json_records(text) if e.get("event") == "outer step applied" and e.get("committed")]


class Replica:
    def __init__(self, root: Path, group: int, lighthouse: int) -> None:
        self.state = root / f"r{group}"
        self.log = root / f"r{group}-{time.monotonic_ns()}.log"
        token = root / "ft.token"  # the group's shared secret, the same file for every replica
        if not token.exists():
            token.write_bytes(b"the benchmark group's shared secret")
        sets = [*COMMON, f"paths.state_dir={self.state}", "train.sync=diloco", f"train.inner_steps_per_outer={INNER}",
                f"ft.token_file={token}",
                "train.effective_batch_size=128", "train.max_steps=100000000", "ft.enabled=true",
                f"ft.lighthouse=http://127.0.0.1:{lighthouse}", "ft.host=127.0.0.1", f"ft.replica_group={group}",
                "ft.min_replicas=2", "ft.quorum_timeout_seconds=10", "ft.timeout_seconds=10",
                "checkpoint.every_inner_steps=50", "api.enabled=false"]
        cmd = [sys.executable, "-m", "daemon", "run"]
        for s in sets:
            cmd += ["--set", s]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})

    def committed(self) -> list[dict]:
        return _committed(self.log)


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    raise SystemExit(f"bench faulttolerance: timed out waiting for {what}")


def main(quick: bool) -> None:
    outage = 10.0 if quick else 30.0
    root = Path(tempfile.mkdtemp(prefix="bench-ft-"))
    port = free_port()
    lighthouse_bin = shutil.which("torchft_lighthouse") or str(Path(sys.executable).parent / "torchft_lighthouse")
    lighthouse = subprocess.Popen([lighthouse_bin, "--bind", f"127.0.0.1:{port}", "--min_replicas", "2",
                                   "--join_timeout_ms", "1000", "--heartbeat_timeout_ms", "1000"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reps = [Replica(root, i, port) for i in range(3)]
    try:
        _wait(lambda: all(sum(e.get("participants") == 3 for e in r.committed()) >= 10 for r in reps), 300,
              "ten outer steps of three replicas")
        healthy = [e["sync_seconds"] for r in reps for e in r.committed() if e.get("participants") == 3][3:]
        reps[2].proc.send_signal(signal.SIGKILL)
        reps[2].proc.wait(10)
        base = [len(r.committed()) for r in reps[:2]]
        time.sleep(outage)
        during = [sum(e.get("participants") == 2 for e in r.committed()[b:]) for r, b in zip(reps[:2], base,
                                                                                             strict=True)]
        t0 = time.monotonic()
        reps[2] = Replica(root, 2, port)
        _wait(lambda: any(e.get("participants") == 3 for e in reps[2].committed()), 300, "the rejoin")
        rejoin = time.monotonic() - t0
        restarts = sum(r.proc.poll() is not None for r in reps[:2])
    finally:
        for r in reps:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGINT)
        for r in reps:
            try:
                r.proc.wait(60)
            except subprocess.TimeoutExpired:
                r.proc.kill()
        lighthouse.kill()
        lighthouse.wait(10)
    # The same job as three torchrun ranks: plain dense all-reduce.
    state = Path(tempfile.mkdtemp(prefix="bench-ft-torchrun-"))
    steps = INNER * 12
    sets = [*COMMON, f"paths.state_dir={state}", "train.sync=diloco", f"train.inner_steps_per_outer={INNER}",
            "train.effective_batch_size=384", f"train.max_steps={steps}"]
    plain = [e["sync_seconds"] for e in minerd_events(sets, 3, "faulttolerance (torchrun)")
             if e.get("event") == "outer step applied" and e.get("rank", 0) == 0][2:]
    ft_median, plain_median = statistics.median(healthy), statistics.median(plain)
    print(f"outer sync, 3 healthy replicas: torchft {ft_median * 1000:.1f} ms (median of {len(healthy)}), "
          f"torchrun {plain_median * 1000:.1f} ms (median of {len(plain)})")
    print(f"outage {outage:.0f}s: survivors committed {during} outer steps; rejoin {rejoin:.1f}s")
    result("faulttolerance", survivor_restarts=restarts, steps_during_outage=min(during), rejoin_seconds=rejoin,
           outer_sync_over_torchrun=ft_median / plain_median)
