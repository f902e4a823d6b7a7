"""Connection hygiene for the monitoring port: a deadline for request headers and a bound on
open connections that never turns away a health probe.

Measured on uvicorn 0.54 with raw sockets (httptools, as uvicorn picks when it is installed;
h11 behaves alike): a connection that sends nothing, or sends half a request line and stops,
is never closed (still open after 15 s and more): ``timeout_keep_alive`` is armed only after a
response, and any byte received cancels it. Its ``limit_concurrency`` counts such connections,
and past the limit it answers 503 to every request, ``/livez`` included: 520 idle sockets made
a live miner look stalled to pm2, systemd and Kubernetes.

So the server speaks HTTP through a subclass of uvicorn's httptools protocol (``httptools`` is
a dependency of ours; the subclass hooks the parser callbacks uvicorn already has rather than
copying them), with two additions:

- **A header deadline.** A connection has ``api.header_timeout_seconds`` to deliver a complete
  set of request headers: from when it is accepted, and again from the end of each response
  (a keep-alive connection waiting for its next request). Bytes arriving do not extend it, so
  a client sending one byte a second is closed as surely as one sending nothing. It is lifted
  while a request is being answered.
- **A connection bound that makes room instead of refusing.** A probe cannot be told from an
  idle socket when it connects, only once its request is read; so past ``api.max_connections``
  open connections a newcomer is let in, and room is made by closing the connection that has
  waited longest for its request headers with nothing unread (an idle or stalled socket; one
  whose request already sits in the kernel's buffer is skipped: it is about to be read). A
  connection is never closed this way within its first half second of waiting (a quarter of
  the header deadline when that is shorter): the server can accept a connection before the
  client's first bytes arrive, and a busy client (one thread among many) can take tens of
  milliseconds between its connect and its send; a probe closed in that gap looked like a dead
  miner. When every waiting connection is that young, the newcomer is let in and room is made
  as soon as the oldest has had its grace. Only at twice the bound (the limit on file
  descriptors) is the grace set aside, and with no idle connection left the newcomer displaces
  the oldest request in flight other than a probe, or, with none, gets a 503 and the door. A
  probe sends its request as it connects, so idle and slow sockets can never lock it out.

uvicorn's ``limit_concurrency`` is not used: it cannot tell a probe from a scrape. Requests in
flight are bounded by the request budget (``api/limits.py``), which keeps a reserve for the
probes. A WebSocket upgrade is not offered (no route needs one, and an upgraded connection
would leave this protocol's bookkeeping).
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import termios
import time
from collections.abc import Callable
from itertools import islice
from typing import Any, ClassVar, Protocol

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.limits import route_class

# Written before closing a newcomer when there is no room at all.
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\nretry-after: 1\r\n\r\n"
# Waiting connections looked at for one with nothing unread before giving up (a bound on the work
# one connection can cause).
_CANDIDATES = 64
# How long a waiting connection is safe from being closed to make room (see above).
_GRACE = 0.5


class Scheduler(Protocol):
    """The event loop's ``call_later``, as the guard uses it."""

    def __call__(self, delay: float, callback: Callable[[], None], /) -> Any: ...


class ConnectionGuard:
    """What one server's connections share: who is open, who waits for headers (since when) and
    who has a request other than a probe in flight (both oldest first), and counts for tests and
    status."""

    def __init__(self, header_timeout: float, max_connections: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.hard_limit = 2 * max_connections
        self.grace = min(_GRACE, header_timeout / 4)
        self.clock = clock
        self.open: set[GuardedHttpProtocol] = set()
        # Insertion-ordered: the first key is the connection that has waited longest; the value is
        # when it began to wait.
        self.waiting: dict[GuardedHttpProtocol, float] = {}
        self.busy: dict[GuardedHttpProtocol, None] = {}
        self.timed_out = 0  # closed for not finishing their headers in time
        self.evicted = 0  # closed to make room under max_connections
        self.refused = 0  # answered 503 at once: no room at all
        self._sweep_pending = False

    def admit(self, conn: GuardedHttpProtocol, call_later: Scheduler) -> None:
        self.open.add(conn)
        if len(self.open) <= self.max_connections:
            return
        wait = self._make_room(conn)
        if wait is None:
            return
        if len(self.open) <= self.hard_limit:
            if wait > 0:
                self._sweep_later(wait, call_later)
            return
        # At the limit on descriptors the grace is a luxury: the youngest idle goes before a
        # request in flight does.
        if wait > 0 and self._make_room(conn, grace=0.0) is None:
            return
        displaced = next(iter(self.busy), None)
        if displaced is not None:
            self.evicted += 1
            displaced.drop()
            return
        self.refused += 1
        conn.refuse()

    def _make_room(self, newcomer: GuardedHttpProtocol | None = None, grace: float | None = None) -> float | None:
        """Close the longest-waiting connection past its grace with nothing unread: None when one
        was closed, else the seconds until the oldest young one is past its grace (0: never)."""
        now = self.clock()
        grace = self.grace if grace is None else grace
        for victim, since in islice(self.waiting.items(), _CANDIDATES):
            if victim is newcomer:
                continue
            young = grace - (now - since)
            if young > 0:
                return young  # oldest first: the others are younger still
            if not victim.unread():
                self.evicted += 1
                victim.drop()
                return None
        return 0.0

    def _sweep_later(self, delay: float, call_later: Scheduler) -> None:
        if self._sweep_pending:
            return
        self._sweep_pending = True

        def sweep() -> None:
            self._sweep_pending = False
            while len(self.open) > self.max_connections:
                wait = self._make_room()
                if wait is not None:
                    if wait > 0:
                        self._sweep_later(wait, call_later)
                    return

        call_later(delay, sweep)

    def status(self) -> dict[str, int]:
        return {
            "open": len(self.open),
            "waiting_for_headers": len(self.waiting),
            "timed_out": self.timed_out,
            "evicted": self.evicted,
            "refused": self.refused,
        }


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline and a connection bound that makes room."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._fd = -1

    def unread(self) -> int:
        """Bytes the kernel holds for this connection that the server has not read yet."""
        if self._fd < 0:
            return 0
        buf = array.array("i", [0])
        try:
            fcntl.ioctl(self._fd, termios.FIONREAD, buf)
        except OSError:
            return 0
        return buf[0]

    # The header deadline.
    def _await_headers(self) -> None:
        """Start the clock for a request's headers, unless it already runs (data never extends it)."""
        if self._deadline is None and not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.guard.header_timeout, self._headers_late)
            self.guard.waiting[self] = self.guard.clock()

    def _headers_arrived(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.guard.waiting.pop(self, None)

    def _headers_late(self) -> None:
        self._deadline = None
        self.guard.timed_out += 1
        self.drop()

    def _forget(self) -> None:
        """No longer counted: closed or closing."""
        self._headers_arrived()
        self.guard.busy.pop(self, None)
        self.guard.open.discard(self)

    def drop(self) -> None:
        """Close this connection now (timed out, or making room for another)."""
        self._forget()
        if not self.transport.is_closing():
            self.transport.close()

    def refuse(self) -> None:
        self._forget()
        if not self.transport.is_closing():
            self.transport.write(_BUSY)
            self.transport.close()

    def _track_request(self) -> None:
        """Count the request now being answered (if any) among those a newcomer may displace."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and route_class(str(cycle.scope["path"])) != "probe":
            self.guard.busy.setdefault(self, None)
        else:
            self.guard.busy.pop(self, None)

    # uvicorn's protocol and parser callbacks.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        self._await_headers()
        self.guard.admit(self, self.loop.call_later)

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        self._fd = -1
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # The first byte of a request pipelined behind one in flight: its headers have a deadline too.
        self._await_headers()

    def on_headers_complete(self) -> None:
        self._headers_arrived()
        super().on_headers_complete()
        self._track_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():  # connection: close, or the client went away
            self._forget()
            return
        self._track_request()  # the next pipelined request, if one was waiting
        if self.cycle is not None and self.cycle.response_complete:
            # Waiting for the next request on a keep-alive connection (uvicorn's own keep-alive
            # timeout closes it sooner when nothing at all arrives).
            self._await_headers()


def guarded_protocol(header_timeout: float, max_connections: int) -> type[GuardedHttpProtocol]:
    """A protocol class for one server (uvicorn takes a class and builds one per connection)."""

    class MinerdHttpProtocol(GuardedHttpProtocol):
        guard = ConnectionGuard(header_timeout, max_connections)

    return MinerdHttpProtocol
