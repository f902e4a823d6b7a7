"""The processes the check starts: each in its own session, its output in a log file, stopped by its id.

Its own session because some of them start processes of their own (torchrun's workers,
torch.compile's compile workers): signalling the process group whose id is the pid we
started reaches all of them and nothing else on the machine. Nothing is ever stopped by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from daemon.logsetup import json_record

ROOT = Path(__file__).resolve().parent.parent.parent
POLL_SECONDS = 0.25

Records = list[dict[str, Any]]


class Child:
    """One started process and its log (stdout and stderr together)."""

    def __init__(self, name: str, cmd: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("wb")
        self._offset = 0
        self._partial = b""
        self._records: Records = []
        self._group_done = False
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, env=dict(env) if env is not None else None, stdout=self._log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self._exited() else None

    def _exited(self) -> bool:
        """Whether the process has ended; the first time it is seen ended, whatever of its group
        outlived it is killed, at once: later the group's id could belong to another process."""
        if self.proc.poll() is None:
            return False
        if not self._group_done:
            self._group_done = True
            self._signal(signal.SIGKILL)
            self._log.close()
        return True

    def records(self) -> Records:
        """Every JSON log record written so far (lines that are not JSON are left out)."""
        with self.log_path.open("rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # a line still being written is read whole next time
        for line in lines:
            record = json_record(line.decode("utf-8", errors="replace"))
            if record is not None:
                self._records.append(record)
        return self._records

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 6) -> str:
        """The last lines of the log, for a reason in the table."""
        return " / ".join(x.strip() for x in self.text().strip().splitlines()[-lines:])

    def wait_until(self, ready: Callable[[Records], bool], timeout: float) -> bool:
        """Polls the log until ``ready`` holds; False when the process ends or time runs out first."""
        end = time.monotonic() + timeout
        while True:
            if ready(self.records()):
                return True
            if self._exited():
                return ready(self.records())
            if time.monotonic() > end:
                return False
            time.sleep(POLL_SECONDS)

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None when it is still running after ``timeout`` seconds."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(max(timeout, 0.0))
        return self.returncode

    def stop(self, grace: float, sig: int = signal.SIGTERM) -> int:
        """``sig`` to the process group (SIGTERM: minerd checkpoints and exits 0), SIGKILL after
        ``grace`` seconds. Returns the exit code (negative: the signal that ended it)."""
        if not self._exited():
            self._signal(sig)
            if self.wait(grace) is None:
                self._signal(signal.SIGKILL)
                self.wait(30)
        rc = self.proc.returncode
        return int(rc) if rc is not None else -int(signal.SIGKILL)  # not even SIGKILL ended it in 30 s

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # the group's id is the pid we started (start_new_session)


class Children:
    """Every process started for the check; those still running at the end are stopped, last first."""

    def __init__(self) -> None:
        self._all: list[Child] = []

    def start(self, name: str, cmd: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> Child:
        child = Child(name, cmd, log_path, env)
        self._all.append(child)
        return child

    def stop_all(self, grace: float = 30) -> None:
        for child in reversed(self._all):
            try:
                child.stop(grace)
            except (OSError, subprocess.SubprocessError) as exc:  # one that will not stop must not keep the rest
                print(f"gpu_check: could not stop {child.name} (pid {child.proc.pid}): {exc}", file=sys.stderr,
                      flush=True)


@contextlib.contextmanager
def children() -> Iterator[Children]:
    kids = Children()
    try:
        yield kids
    finally:
        kids.stop_all()
