"""sd_notify against a real AF_UNIX datagram socket, as systemd listens."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.sdnotify import SdNotifier, watchdog_interval
from daemon.state import MinerState


class Listener:
    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def messages(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    yield Listener(sock, str(path))
    sock.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestWithoutNotifySocket:
    """Under pm2 or in a terminal there is no NOTIFY_SOCKET and nothing is sent."""

    def test_every_call_is_a_no_op(self) -> None:
        n = SdNotifier({})
        assert not n.enabled and not n.watchdog_enabled
        assert n.notify("READY=1") is False
        n.ready()
        n.status("x")
        assert n.ping(force=True) is False
        n.stopping()
        state = MinerState()
        n.attach(state)
        state.beat()
        n.stop()


class TestMessages:
    """READY, STATUS and STOPPING reach the socket in systemd's format."""

    def test_ready_status_stopping(self, listener: Listener) -> None:
        n = SdNotifier({"NOTIFY_SOCKET": listener.env_value})
        assert n.enabled and not n.watchdog_enabled
        n.ready()
        n.ready()  # once only
        n.status("training: outer 1\ninner 2")
        n.stopping("stopping: final checkpoint")
        n.stop()  # STOPPING already sent: not again
        assert listener.messages() == [
            "READY=1",
            "STATUS=training: outer 1 inner 2",
            "STOPPING=1\nSTATUS=stopping: final checkpoint",
        ]

    def test_abstract_namespace_address(self) -> None:
        name = f"minerd-test-{uuid.uuid4().hex}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("\0" + name)
        sock.settimeout(2)
        try:
            n = SdNotifier({"NOTIFY_SOCKET": "@" + name})
            n.ready()
            assert sock.recv(100) == b"READY=1"
        finally:
            sock.close()

    def test_a_vanished_socket_never_raises(self, tmp_path: Path) -> None:
        n = SdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock"), "WATCHDOG_USEC": "1000000"})
        assert n.notify("READY=1") is False
        assert n.ping() is False


class TestWatchdogPings:
    """WATCHDOG=1 rides on the heartbeat, throttled to a quarter of WATCHDOG_USEC."""

    def test_interval_from_the_environment(self) -> None:
        assert watchdog_interval({"WATCHDOG_USEC": "20000000"}) == 20.0
        assert watchdog_interval({}) is None
        assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
        assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
        assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
        assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}) == 1.0

    def test_pings_follow_beats_and_are_throttled(self, listener: Listener) -> None:
        clock = FakeClock()
        n = SdNotifier({"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "20000000"}, clock=clock)
        assert n.ping_every == 5.0
        state = MinerState()
        n.attach(state)
        state.beat()  # starting: a ping and a status, no READY
        first = listener.messages()
        assert "WATCHDOG=1" in first and "READY=1" not in first
        assert any(m.startswith("STATUS=starting: outer 0 inner 0") for m in first)
        for _ in range(50):  # many beats inside one throttle window: no more pings
            clock.now += 0.05
            state.beat()
        assert "WATCHDOG=1" not in listener.messages()
        clock.now += 5.0
        state.beat()
        assert listener.messages().count("WATCHDOG=1") == 1
        # No beats (a stuck loop): no pings, whatever the time; systemd will act.
        clock.now += 60
        assert listener.messages() == []

    def test_ready_on_the_first_beat_after_the_first_step(self, listener: Listener) -> None:
        clock = FakeClock()
        n = SdNotifier({"NOTIFY_SOCKET": listener.env_value}, clock=clock)
        state = MinerState()
        n.attach(state)
        state.beat()
        assert "READY=1" not in listener.messages()
        state.first_step_done = True
        state.phase = "training"
        state.inner_step = 1
        state.loss = 0.25
        clock.now += 10
        state.beat()
        msgs = listener.messages()
        assert msgs[0] == "READY=1"
        assert "STATUS=training: outer 0 inner 1 global 0 epoch 0 loss 0.2500" in msgs
        state.beat()
        assert "READY=1" not in listener.messages()
