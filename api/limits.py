"""Load shedding: the monitoring port can never take the training's CPU, and no client can
take another's share of it.

Every request is served on the event loop of the API thread, which shares the GIL
and the cores with the training loop; 50 scrapers in a tight loop once took 68% of
its speed. So requests draw from token buckets, one set per class of route:

- ``probe``: ``/livez`` and ``/readyz``, cheap, and what supervisors read to decide
  whether the miner is alive (at least ``PROBE_RATE`` a second);
- ``metrics``: ``/metrics`` (``api.metrics_requests_per_second``);
- ``control``: ``/control/*`` (``api.control_requests_per_second``);
- ``other``: ``/status``, ``/diagnostics`` and anything else (``api.requests_per_second``).

Within a class each client address has its own bucket (an IPv6 client its /64), under a
ceiling for the whole class of ``CLIENT_SHARE`` clients' worth: a client hammering
``/status`` is slowed to its own budget and leaves the other clients theirs, another
class's budget untouched, and the total the port can cost the training bounded.

A request over budget waits for its turn; one that would wait longer than ``MAX_WAIT``
seconds waits that long and is answered 429 with ``Retry-After``. Waiting costs the
event loop nothing, and a client that waits sends its next request later: a flood of
any number of clients is slowed to the budget, instead of being served or refused as
fast as it can ask.

Requests in flight (waiting ones included) other than the probes are bounded by
``max_in_flight`` (``api.max_connections`` less ``probe_reserve`` of it): past it they are
answered 503 at once, so the probes always have room (``api/connections.py`` keeps
idle and slow connections from taking it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable
from typing import Any

PROBES = frozenset({"/livez", "/readyz"})
MAX_WAIT = 1.0
PROBE_RATE = 50.0  # per client, at least: pm2, systemd and a kubelet probe a few times a minute
CLIENT_SHARE = 4  # a class's ceiling is this many clients' budgets: one client takes at most a quarter
MAX_CLIENTS = 1024  # buckets kept per class; past it, clients not seen lately share one
OVERFLOW = "*"

_REFUSED_HEADERS = [(b"content-type", b"application/json"), (b"retry-after", b"1")]


def route_class(path: str) -> str:
    """The budget a path draws from: probe, metrics, control or other."""
    if path in PROBES:
        return "probe"
    if path == "/metrics":
        return "metrics"
    if path.startswith("/control/"):
        return "control"
    return "other"


def probe_reserve(max_connections: int) -> int:
    """Connections and requests in flight kept for the health probes out of ``max_connections``."""
    return max(4, max_connections // 8)


def client_key(scope: dict[str, Any]) -> str:
    """The address a budget is kept for: the peer's IP, an IPv6 peer's /64 (one host can hold a
    whole /64; an IPv4 host usually has one address)."""
    client = scope.get("client")
    host = str(client[0]) if client else ""
    if ":" in host:
        try:
            return str(ipaddress.ip_network(f"{host}/64", strict=False))
        except ValueError:
            pass
    return host


class TokenBucket:
    """``rate`` tokens a second, up to ``burst``; ``reserve`` says how long to wait for one."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = time.monotonic()

    def wait(self, now: float) -> float:
        """Seconds until a token is free (0 = now), taking nothing."""
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
        return (1.0 - self._tokens) / self.rate if self._tokens < 1.0 else 0.0

    def take(self) -> None:
        self._tokens -= 1.0  # may go negative: later requests queue behind this one

    def full(self, now: float) -> bool:
        """Refilled to its burst: forgetting it changes nothing."""
        self.wait(now)
        return self._tokens >= self.burst

    def reserve(self, max_wait: float) -> float | None:
        """Seconds to wait before going ahead (0 = now), or None when that would exceed ``max_wait``."""
        wait = self.wait(time.monotonic())
        if wait > max_wait:
            return None
        self.take()
        return wait


class Budget:
    """One class of routes: a bucket per client address, under a ceiling for them all."""

    def __init__(self, rate: float, share: int = CLIENT_SHARE, max_clients: int = MAX_CLIENTS) -> None:
        self.rate = rate
        # A burst of at least one request, or a rate under 1/s could never serve one.
        self.burst = max(rate, 1.0)
        self.total = TokenBucket(rate * share, self.burst * share)
        self.max_clients = max_clients
        self.clients: dict[str, TokenBucket] = {}
        self._pruned_at = -1.0

    def _bucket(self, client: str, now: float) -> TokenBucket:
        bucket = self.clients.get(client)
        if bucket is not None:
            return bucket
        if len(self.clients) >= self.max_clients and now - self._pruned_at >= 1.0:
            # At most once a second, so that many clients cannot make every request pay for a sweep.
            self._pruned_at = now
            for key in [k for k, b in self.clients.items() if b.full(now)]:
                del self.clients[key]
        if len(self.clients) >= self.max_clients:
            client = OVERFLOW  # too many clients at once: the newcomers share one bucket
            bucket = self.clients.get(client)
            if bucket is not None:
                return bucket
        bucket = self.clients[client] = TokenBucket(self.rate, self.burst)
        return bucket

    def reserve(self, client: str, max_wait: float) -> float | None:
        """Seconds this client's request waits (0 = now), or None when over ``max_wait``
        (nothing is then taken: a refused request costs no one a token)."""
        now = time.monotonic()
        own = self._bucket(client, now)
        wait = max(own.wait(now), self.total.wait(now))
        if wait > max_wait:
            return None
        own.take()
        self.total.take()
        return wait


class LoadShedder:
    """Pure ASGI middleware: each HTTP request takes a token of its client's bucket for its route first."""

    def __init__(
        self,
        app: Any,
        rate: float,
        *,
        metrics_rate: float | None = None,
        control_rate: float | None = None,
        max_in_flight: int | None = None,
        on_shed: Callable[[], None] = lambda: None,
    ) -> None:
        self.app = app
        self.budgets = {
            "probe": Budget(max(rate, PROBE_RATE)),
            "metrics": Budget(metrics_rate or rate),
            "control": Budget(control_rate or rate),
            "other": Budget(rate),
        }
        self.max_in_flight = max_in_flight
        self.in_flight = 0  # requests other than the probes, waiting ones included
        self.on_shed = on_shed

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        kind = route_class(str(scope.get("path", "")))
        if kind == "probe":
            await self._within_budget(kind, scope, receive, send)
            return
        if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
            # The rest is the probes' reserve. Closing the connection frees a socket too.
            await send({"type": "http.response.start", "status": 503,
                        "headers": [*_REFUSED_HEADERS, (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": b'{"detail":"too many requests in flight"}'})
            return
        self.in_flight += 1
        try:
            await self._within_budget(kind, scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _within_budget(self, kind: str, scope: dict[str, Any], receive: Any, send: Any) -> None:
        wait = self.budgets[kind].reserve(client_key(scope), MAX_WAIT)
        if wait is None:
            await asyncio.sleep(MAX_WAIT)
            self.on_shed()
            await send({"type": "http.response.start", "status": 429, "headers": _REFUSED_HEADERS})
            await send({"type": "http.response.body", "body": b'{"detail":"over the request budget; retry later"}'})
            return
        if wait > 0:
            await asyncio.sleep(wait)
        await self.app(scope, receive, send)
