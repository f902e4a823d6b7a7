"""Shared fixtures: logging reset, small configs, and a real `minerd run` subprocess."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from daemon.logsetup import json_records

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)

# Small enough to train a few dozen steps in seconds on a busy 2-core machine.
SMALL = [
    "train.task=twotower",
    "twotower.corpus=synthetic",
    "twotower.num_docs=2048",
    "twotower.eval_queries=128",
    "twotower.dim=32",
    "twotower.hidden_dim=64",
    "twotower.embed_dim=32",
    "train.batch_size=64",
    "train.effective_batch_size=128",
    "train.inner_steps_per_outer=7",
    "train.warmup_steps=5",
    "train.torch_threads=1",
    "mining.enabled=false",
    "upload.enabled=false",
    "telemetry.log_format=json",
    "checkpoint.every_inner_steps=5",
    # Tests count steps, not seconds: no time floor under the step schedules.
    "checkpoint.min_interval_seconds=0",
    "upload.min_interval_seconds=0",
]


# Real code as text: three packages of the standard library (about 640 KB, 39 files),
# a small tokenizer and short sequences, so a step takes a fraction of a second.
LM_CORPUS = [str(Path(sysconfig.get_paths()["stdlib"]) / name) for name in ("email", "http", "json")]
SMALL_LM = [
    "train.task=causal_lm",
    f"lm.corpus=[{', '.join(LM_CORPUS)}]",
    "lm.vocab_size=1024",
    "lm.seq_len=64",
    "lm.eval_fraction=0.1",
    "lm.eval_sequences=16",
    "lm.eval_every_steps=10",
    "train.batch_size=8",
    "train.effective_batch_size=16",
    "train.inner_steps_per_outer=7",
    "train.warmup_steps=5",
    "train.torch_threads=1",
    "upload.enabled=false",
    "telemetry.log_format=json",
    "checkpoint.every_inner_steps=5",
    "checkpoint.min_interval_seconds=0",
    "upload.min_interval_seconds=0",
]


@pytest.fixture(autouse=True)
def _fast_tier_starts_nothing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`make test-fast` (everything not marked integration or slow) starts no process and no
    server, so that it stays quick and runs anywhere: a test that does fails here, naming
    the marker it needs."""
    if request.node.get_closest_marker("integration") is not None:
        yield
        return

    def refuse(what: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"{request.node.nodeid} {what}: mark it integration")
        return refused

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse("starts a process"))
    monkeypatch.setattr(socket.socket, "listen", refuse("starts a server"))
    yield


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    from daemon.logsetup import reset_logging

    yield
    reset_logging()


def cli(*args: str) -> tuple[int, str, str]:
    """``minerd ARGS`` in this process: exit code, stdout, stderr."""
    from daemon.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main(list(args))
    code = exc.value.code
    return (code if isinstance(code, int) else 1), out.getvalue(), err.getvalue()


# Every registered task's small job: the tests that run "each task" run these
# (tests/test_plugins.py checks that no registered task is missing).
SMALL_JOBS = {"causal_lm": SMALL_LM, "twotower": SMALL}
TASKS = list(SMALL_JOBS)


def small_sets(state_dir: Path, *extra: str) -> list[str]:
    """The small two-tower job."""
    return task_sets("twotower", state_dir, *extra)


def small_lm_sets(state_dir: Path, *extra: str) -> list[str]:
    """The small language-model job."""
    return task_sets("causal_lm", state_dir, *extra)


def task_sets(task: str, state_dir: Path, *extra: str) -> list[str]:
    """The small job of ``task`` in ``state_dir``, with ``extra`` settings last."""
    return [*SMALL_JOBS[task], f"paths.state_dir={state_dir}", *extra]


def finish(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> list[dict]:
    """Wait for a run started with its output in ``log`` to exit 0 (killed, by its pid, if it does
    not within ``timeout``); its JSON log lines."""
    try:
        assert proc.wait(timeout) == 0, log.read_text(errors="replace")[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return json_records(log.read_text(errors="replace"))


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of a GET; (0, {}) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except OSError:
        return 0, {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_tool(name: str, path: str | None) -> str:
    """A missing tool skips outside CI and fails in CI (MINERD_REQUIRE_TOOLS)."""
    if path:
        return path
    if os.environ.get("MINERD_REQUIRE_TOOLS") or os.environ.get("CI"):
        pytest.fail(f"{name} is required in CI but is not installed (run .ci/install-tools.sh)")
    pytest.skip(f"{name} not installed (run .ci/install-tools.sh)")


class MinerProcess:
    """A real `python -m daemon run` subprocess, stopped by its own pid."""

    def __init__(self, state_dir: Path, sets: list[str], env: dict[str, str] | None = None,
                 module: str = "daemon", log_dir: Path | None = None) -> None:
        self.state_dir = state_dir
        # Beside the state directory unless told: a test that fills the state's disk keeps its
        # log elsewhere, or the lines it waits for are lost to the full disk.
        self.log_path = (log_dir or state_dir.parent) / f"{state_dir.name}-{time.monotonic_ns()}.log"
        args = [sys.executable, "-m", module, "run"]
        for s in sets:
            args += ["--set", s]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("WORLD_SIZE", None)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines so far (telemetry.log_format=json)."""
        return json_records(self.text())

    def api_url(self, timeout: float = 90) -> str:
        """The URL its `API listening` line names (``api.port=0`` picks a free port)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for e in self.events():
                if e.get("event") == "API listening":
                    return str(e["url"])
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no API listening line:\n{self.text()[-3000:]}")

    def wait_for(self, needle: str, timeout: float = 90) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if needle in self.text():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"miner exited ({self.proc.returncode}) before {needle!r}:\n{self.text()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {needle!r}:\n{self.text()[-3000:]}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def miner_factory(tmp_path: Path) -> Iterator[object]:
    started: list[MinerProcess] = []

    def start(state_dir: Path, sets: list[str], env: dict[str, str] | None = None,
              module: str = "daemon") -> MinerProcess:
        m = MinerProcess(state_dir, sets, env, module, log_dir=tmp_path)
        started.append(m)
        return m

    yield start
    for m in started:
        m.kill()


BUCKET = "miner"


class MotoServer:
    """moto's standalone server as a subprocess, stopped by its own pid."""

    def __init__(self, log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("moto server did not come up")
        # moto keeps everything in memory: a restarted server has no bucket.
        import boto3

        boto3.client("s3", endpoint_url=self.url, region_name="us-east-1").create_bucket(Bucket=BUCKET)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
