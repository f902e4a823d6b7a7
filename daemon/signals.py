"""Shutdown signals set flags; a deadline thread makes sure we do exit.

SIGINT is what pm2 sends on stop/restart (then SIGKILL after kill_timeout);
SIGTERM is what systemd sends (then SIGKILL after TimeoutStopSec). The first
one asks the loop to finish its inner step, checkpoint and stop components;
a second one exits at once. If the graceful path has not finished within
``shutdown.deadline_seconds``, the deadline thread logs every thread's stack
and exits 1, so the supervisor's SIGKILL never lands mid-write.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

import structlog

from daemon.watchdog import log_thread_stacks

log = structlog.get_logger(__name__)

# Past this share of the deadline a partial inner step is abandoned, leaving
# the rest for the checkpoint and the components' stop.
ABANDON_SHARE = 0.5


class Shutdown:
    def __init__(self, deadline_seconds: float, exit_fn: Callable[[int], None] = os._exit) -> None:
        self.deadline_seconds = deadline_seconds
        self._exit = exit_fn
        self._requested = threading.Event()
        self._finished = threading.Event()
        self._requested_at: float | None = None
        self._signals = 0
        self.reason: str | None = None
        self._thread = threading.Thread(target=self._enforce_deadline, name="shutdown-deadline", daemon=True)

    # -- flags ---------------------------------------------------------------
    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    def request(self, reason: str) -> None:
        if self._requested_at is None:
            self._requested_at = time.monotonic()
            self.reason = reason
        self._requested.set()

    def abandon_partial_step(self) -> bool:
        at = self._requested_at
        return at is not None and time.monotonic() - at > self.deadline_seconds * ABANDON_SHARE

    def finished(self) -> None:
        """The graceful path is done; the deadline no longer applies."""
        self._finished.set()

    # -- installation --------------------------------------------------------
    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)  # pm2 stop/restart, Ctrl-C
        signal.signal(signal.SIGTERM, self._handle)  # systemd stop, docker stop, kill
        self._thread.start()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            # A second signal: the operator wants out now.
            log.warning("second signal: exiting immediately", signal=signal.Signals(signum).name)
            self._exit(1)
            return
        self.request(signal.Signals(signum).name)

    def _enforce_deadline(self) -> None:
        self._requested.wait()
        if self._finished.wait(self.deadline_seconds):
            return
        log.error("shutdown deadline passed; exiting without finishing", deadline_seconds=self.deadline_seconds)
        log_thread_stacks()
        self._exit(1)
