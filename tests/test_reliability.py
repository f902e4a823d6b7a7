"""The reliability suite: what a long-running miner must survive without losing a run.

Each scenario drives a real `minerd run` and checks what an operator would: the exit code,
the log lines, the metrics, what is on disk afterwards. docs/RELIABILITY.md lists every
scenario with what was observed. The disk-full scenarios need a small file system to fill:
a tmpfs mounted for the test (as root, as CI runs); elsewhere they are skipped, and CI fails
rather than skip them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, MinerProcess, free_port, small_sets

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


@contextlib.contextmanager
def small_disk(path: Path, megabytes: int) -> Iterator[Path]:
    """A tmpfs of ``megabytes`` at ``path``, unmounted afterwards (by its path)."""
    if os.geteuid() != 0:
        message = "mounting a small tmpfs needs root"
        if os.environ.get("MINERD_REQUIRE_TOOLS") or os.environ.get("CI"):
            pytest.fail(f"{message}; CI runs as root")
        pytest.skip(message)
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free on ``disk``."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    filler = disk / "filler.bin"
    with filler.open("wb") as fh:
        fh.truncate(0)
        remaining = max(0, free - leave)
        block = b"\0" * (1 << 20)
        while remaining > 0:
            n = min(len(block), remaining)
            try:
                fh.write(block[:n])
            except OSError:
                break
            remaining -= n
    return filler


def events(m: MinerProcess) -> list[dict]:
    out = []
    for line in m.text().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def metric(url: str, name: str, **labels: str) -> float | None:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def wait_until(cond, timeout: float, what: str, m: MinerProcess) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        if m.proc.poll() is not None:
            raise AssertionError(f"miner exited ({m.proc.returncode}) before {what}:\n{m.text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{m.text()[-3000:]}")


@pytest.mark.slow
class TestDiskFull:
    """A full disk skips checkpoints and uploads with one DISK FULL line each, and training goes on."""

    def test_checkpoints_and_uploads_skip_then_resume(self, tmp_path: Path, miner_factory) -> None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with small_disk(tmp_path / "disk", 96) as disk:
            state = disk / "state"
            sets = small_sets(state, f"api.port={port}", "checkpoint.every_inner_steps=3", "upload.enabled=true",
                              "upload.min_inner_step=3", "upload.every_inner_steps=3", "train.max_steps=100000")
            m = miner_factory(state, sets)
            ckpts = state / "checkpoints"
            wait_until(lambda: len(list(ckpts.glob("step-*"))) >= 2, 120, "two checkpoints", m)
            wait_until(lambda: (state / "uploads" / "LATEST").exists(), 60, "a first upload", m)
            # 1. The disk fills: checkpoints and uploads are refused, one DISK FULL line each.
            filler = fill(disk, leave=64 << 10)
            wait_until(lambda: sum(str(e.get("event", "")).startswith("DISK FULL: checkpoint") for e in events(m))
                       >= 2, 120, "two refused checkpoints", m)
            wait_until(lambda: any(str(e.get("event", "")).startswith("DISK FULL: upload revision")
                                   for e in events(m)), 60, "a refused upload", m)
            step_before = get(f"{url}/status")[1]["global_step"]
            wait_until(lambda: get(f"{url}/status")[1]["global_step"] > step_before + 5, 60, "training going on", m)
            line = next(e for e in events(m) if str(e.get("event", "")).startswith("DISK FULL: checkpoint"))
            assert line["level"] == "error" and line["free_bytes"] < 1 << 20 and str(ckpts) in line["event"]
            assert (metric(url, "minerd_disk_full_total", what="checkpoint") or 0) >= 2
            assert (metric(url, "minerd_disk_free_bytes", path=str(state)) or 1 << 30) < 1 << 20
            # 2. Nothing half-written: no temporary files, the newest checkpoint and revision verify.
            assert not list(ckpts.glob(".tmp-*"))
            assert not [p for p in (state / "uploads").rglob("*") if p.name.endswith(".tmp")]
            verify = subprocess.run([sys.executable, "-m", "daemon", "verify-upload", str(state / "uploads")],
                                    capture_output=True, text=True, timeout=120, cwd=ROOT)
            assert verify.returncode == 0, verify.stderr
            # 3. Room again: the next checkpoint is written without a restart.
            saved = len([e for e in events(m) if e.get("event") == "checkpoint saved"])
            filler.unlink()
            wait_until(lambda: len([e for e in events(m) if e.get("event") == "checkpoint saved"]) > saved, 60,
                       "a checkpoint once there is room", m)
            m.signal(2)
            assert m.wait(60) == 0, m.text()[-3000:]
            assert "unrecoverable error" not in m.text()

    def test_start_up_waits_for_room_not_ready(self, tmp_path: Path, miner_factory) -> None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with small_disk(tmp_path / "disk", 80) as disk:
            state = disk / "state"
            filler = fill(disk, leave=16 << 20)  # under the 64 MB the start-up asks for
            m = miner_factory(state, small_sets(state, f"api.port={port}", "train.max_steps=100000"))
            wait_until(lambda: "DISK FULL:" in m.text(), 90, "the DISK FULL line at start-up", m)
            code, body = get(f"{url}/readyz")
            assert code == 503 and body["reason"].startswith("disk full:"), body
            assert get(f"{url}/livez")[0] == 200  # waiting is not a stall
            time.sleep(3)
            assert m.proc.poll() is None  # waiting, not exiting into a restart loop
            filler.unlink()
            wait_until(lambda: get(f"{url}/readyz")[0] == 200, 90, "ready once there is room", m)
            m.signal(2)
            assert m.wait(60) == 0, m.text()[-3000:]
