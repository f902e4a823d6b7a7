"""systemd notifications (sd_notify(3)) over $NOTIFY_SOCKET, without a dependency.

The protocol is one AF_UNIX datagram of ``KEY=value`` lines; a socket path
starting with ``@`` is in the abstract namespace. When ``NOTIFY_SOCKET`` is
unset (pm2, a terminal, tests) every method does nothing.

``attach(state)`` puts the notifier on the training-progress path: it is a
``MinerState.on_beat`` listener, so ``WATCHDOG=1`` goes out only while
training advances (a free-running timer would keep a hung miner alive),
``READY=1`` goes out on the first beat after the first inner step, and a
one-line ``STATUS=`` now and then. Each send is a non-blocking datagram; a
failure is logged at debug and never reaches the training loop.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

import structlog

from daemon.state import MinerState

log = structlog.get_logger(__name__)

STATUS_EVERY_SECONDS = 10.0


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between two WATCHDOG=1 at the most, as sd_watchdog_enabled(3) decides; None = off."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):  # the watchdog is meant for another process
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


def status_line(state: MinerState) -> str:
    loss = f"{state.loss:.4f}" if state.loss is not None else "n/a"
    return (
        f"{state.phase}: outer {state.outer_step} inner {state.inner_step} "
        f"global {state.global_step} epoch {state.epoch} loss {loss}"
    )


class SdNotifier:
    """sd_notify over one datagram socket; a no-op when ``NOTIFY_SOCKET`` is unset."""

    name = "sdnotify"

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET") or ""
        self._address: str | None = None
        if path.startswith("@"):
            self._address = "\0" + path[1:]
        elif path.startswith("/"):
            self._address = path
        elif path:
            log.warning("NOTIFY_SOCKET ignored: not a path or @abstract name", notify_socket=path)
        self._clock = clock
        watchdog = watchdog_interval(env) if self._address else None
        # systemd wants a ping at least every half of WATCHDOG_USEC; pings are
        # throttled to one per quarter, so with beats at least that frequent a
        # ping is never later than half.
        self.ping_every: float | None = watchdog / 4 if watchdog is not None else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._last_ping: float | None = None
        self._last_status: float | None = None
        self._ready_sent = False
        self._stopping_sent = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_enabled(self) -> bool:
        return self.ping_every is not None

    def notify(self, message: str) -> bool:
        """Send one datagram; True when it was sent."""
        if self._address is None:
            return False
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    self._sock.setblocking(False)
                self._sock.sendto(message.encode(), self._address)
            except OSError as exc:
                log.debug("sd_notify failed", message=message.split("=", 1)[0], error=str(exc))
                return False
        return True

    def ready(self) -> None:
        if not self._ready_sent and self.notify("READY=1"):
            self._ready_sent = True
            log.info("systemd notified: READY=1")

    def status(self, line: str) -> None:
        """``STATUS=`` takes one line; newlines would start new assignments."""
        self.notify("STATUS=" + " ".join(line.split()))

    def ping(self, *, force: bool = False) -> bool:
        """WATCHDOG=1, at most once per ``ping_every`` unless forced; True when sent."""
        if self.ping_every is None:
            return False
        now = self._clock()
        if not force and self._last_ping is not None and now - self._last_ping < self.ping_every:
            return False
        if self.notify("WATCHDOG=1"):
            self._last_ping = now
            return True
        return False

    def stopping(self, line: str = "stopping") -> None:
        """Call when shutdown begins (phase "stopping"), before the final checkpoint."""
        if not self._stopping_sent and self.notify(f"STOPPING=1\nSTATUS={' '.join(line.split())}"):
            self._stopping_sent = True

    def start(self) -> None:
        """Nothing to start (``attach`` does the work); here for ``Lifecycle``."""

    def stop(self, timeout: float = 0.0) -> None:
        """``STOPPING=1`` if the runner has not sent it yet, then close the socket."""
        self.stopping()
        self.close()

    def attach(self, state: MinerState) -> None:
        """Listen to the heartbeat: READY once ready, WATCHDOG throttled, STATUS every 10 s."""
        if not self.enabled:
            return

        def on_beat() -> None:
            if not self._ready_sent and state.ready:
                self.ready()
            self.ping()
            now = self._clock()
            if self._last_status is None or now - self._last_status >= STATUS_EVERY_SECONDS:
                self._last_status = now
                self.status(status_line(state))

        state.on_beat(on_beat)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
