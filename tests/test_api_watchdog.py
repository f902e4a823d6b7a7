"""The stall watchdog, with an injected exit function so the test process survives."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import structlog

from daemon.config import WatchdogConfig
from daemon.logsetup import reset_logging
from daemon.state import MinerState
from daemon.watchdog import EXIT_STALLED, Watchdog


@pytest.fixture(autouse=True)
def _plain_structlog() -> Iterator[None]:
    reset_logging()
    yield
    reset_logging()


def wait_for(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(0.01)
    return False


class TestExitOnStall:
    """With exit_on_stall, a stale heartbeat dumps every thread's stack and exits with code 3."""

    def test_exit_code_3_and_stacks_in_the_log(self) -> None:
        state = MinerState(phase="training")
        codes: list[int] = []
        stuck = threading.Event()

        def stuck_trainer() -> None:  # a named thread whose stack must show up
            stuck.wait(10)

        t = threading.Thread(target=stuck_trainer, name="stuck-trainer", daemon=True)
        t.start()
        dog = Watchdog(state, WatchdogConfig(stall_seconds=0.2, exit_on_stall=True), exit_fn=codes.append)
        try:
            with structlog.testing.capture_logs() as logs:
                dog.start()
                assert wait_for(lambda: codes)
        finally:
            dog.stop()
            stuck.set()
        assert codes == [EXIT_STALLED]
        errors = [e for e in logs if e["log_level"] == "error"]
        first = errors[0]
        assert first["event"].startswith("TRAINING STALLED") and "exiting with code 3" in first["event"]
        assert first["progress_age_seconds"] >= 0.2
        stacks = {e["thread"]: e["stack"] for e in logs if "stack" in e}
        assert all(e["log_level"] == "error" for e in logs if "stack" in e)
        assert "stuck_trainer" in stacks["stuck-trainer"]
        assert "MainThread" in stacks
        assert "minerd-watchdog" in stacks

    def test_progress_keeps_it_quiet(self) -> None:
        state = MinerState(phase="training")
        codes: list[int] = []
        dog = Watchdog(
            state, WatchdogConfig(stall_seconds=0.3, exit_on_stall=True), exit_fn=codes.append, interval=0.02
        )
        dog.start()
        try:
            end = time.monotonic() + 0.8
            while time.monotonic() < end:
                state.beat()
                time.sleep(0.02)
        finally:
            dog.stop()
        assert codes == []


class TestWarnOnly:
    """Without exit_on_stall the stall is logged once and recovery is logged."""

    def test_logs_stall_once_then_recovery(self) -> None:
        state = MinerState(phase="training")
        codes: list[int] = []
        dog = Watchdog(state, WatchdogConfig(stall_seconds=0.1, exit_on_stall=False), exit_fn=codes.append)
        with structlog.testing.capture_logs() as logs:
            time.sleep(0.15)
            assert dog.check() is True
            assert dog.check() is True
            state.beat()
            assert dog.check() is False
        assert codes == []
        events = [e["event"] for e in logs]
        assert len([e for e in events if e.startswith("TRAINING STALLED")]) == 1
        assert events[-1] == "training progress resumed"

    def test_stop_ends_the_thread_promptly(self) -> None:
        dog = Watchdog(MinerState(), WatchdogConfig(stall_seconds=600))
        dog.start()
        t0 = time.monotonic()
        dog.stop()
        assert time.monotonic() - t0 < 1.0
