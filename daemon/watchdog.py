"""Stall watchdog: exit with code 3 when training stops making progress.

The heartbeat (``MinerState.beat``) is moved only by training progress
(micro-steps, checkpoints, evaluation chunks; the loop also beats while it
waits in a pause), never by a timer, so an old heartbeat means the training
thread is stuck: a hung collective, a dead data worker, a deadlock.

With ``watchdog.exit_on_stall`` the process dumps every thread's stack to the
log and leaves through ``os._exit(3)``: ``sys.exit`` from this thread would
only end this thread, and a stuck main thread would never run cleanup
anyway. pm2 or systemd then restarts the miner, which resumes from its last
checkpoint. Without it, the stall is logged (and ``/livez`` says 503) and the
watchdog keeps watching.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable

import structlog

from daemon.config import WatchdogConfig
from daemon.state import MinerState

log = structlog.get_logger(__name__)

EXIT_STALLED = 3  # `minerd run` exits 3 when stalled (README: exit codes)


def _flush_logs() -> None:
    """os._exit skips every flush; the stacks must reach pm2/journald first."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()


def log_thread_stacks() -> int:
    """Log every live thread's stack as an error; returns how many were logged."""
    names = {t.ident: t.name for t in threading.enumerate()}
    frames = sys._current_frames()
    for ident, frame in frames.items():
        log.error(
            f"stack of thread {names.get(ident, '?')}",
            thread=names.get(ident, "?"),
            thread_id=ident,
            stack="".join(traceback.format_stack(frame)),
        )
    return len(frames)


class Watchdog:
    """A daemon thread comparing ``state.progress_age()`` with ``stall_seconds``."""

    name = "watchdog"

    def __init__(
        self,
        state: MinerState,
        cfg: WatchdogConfig,
        *,
        exit_fn: Callable[[int], object] = os._exit,
        interval: float | None = None,
    ) -> None:
        self._state = state
        self._cfg = cfg
        self._exit = exit_fn
        # A stall is noticed within a quarter of stall_seconds (5 s at most).
        self._interval = interval if interval is not None else min(5.0, max(0.05, cfg.stall_seconds / 4))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stalled = False
        self.fired = False

    def check(self) -> bool:
        """One look at the heartbeat; True while stalled. Acts on a stall (exit or warn)."""
        age = self._state.progress_age()
        limit = self._cfg.stall_seconds
        if age <= limit:
            if self._stalled:
                log.warning("training progress resumed", progress_age_seconds=round(age, 1))
            self._stalled = False
            return False
        if self._cfg.exit_on_stall:
            if not self.fired:
                self.fired = True
                self._fire(age)
            return True
        if not self._stalled:
            log.error(
                f"TRAINING STALLED: no progress for {age:.1f}s (watchdog.stall_seconds={limit:g}); "
                "watchdog.exit_on_stall is off, so the miner keeps running",
                progress_age_seconds=round(age, 1),
                phase=self._state.phase,
            )
        self._stalled = True
        return True

    def _fire(self, age: float) -> None:
        log.error(
            f"TRAINING STALLED: no progress for {age:.1f}s (watchdog.stall_seconds="
            f"{self._cfg.stall_seconds:g}); dumping thread stacks and exiting with code {EXIT_STALLED}",
            progress_age_seconds=round(age, 1),
            phase=self._state.phase,
            outer_step=self._state.outer_step,
            inner_step=self._state.inner_step,
        )
        log_thread_stacks()
        _flush_logs()
        self._exit(EXIT_STALLED)

    def _run(self) -> None:
        log.debug("watchdog started", stall_seconds=self._cfg.stall_seconds, interval=self._interval)
        while not self._stop.wait(self._interval):
            self.check()
        log.debug("watchdog stopped")

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("Watchdog.start() called twice")
        self._thread = threading.Thread(target=self._run, name="minerd-watchdog", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
