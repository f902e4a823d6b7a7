"""Load shedding: the monitoring port can never take the training's CPU.

Every request is served on the event loop of the API thread, which shares the GIL
and the cores with the training loop; 50 scrapers in a tight loop once took 68% of
its speed. So requests draw from token buckets: one for the health probes
(``/livez``, ``/readyz``: cheap, and they must keep answering under a flood), one
for everything else (``api.requests_per_second``). A request over budget waits
for its turn; one that would wait longer than ``MAX_WAIT`` seconds waits that long
and is answered 429 with ``Retry-After``. Waiting costs the event loop nothing,
and a client that waits sends its next request later: a flood of any number of
clients is slowed to the budget, instead of being served or refused as fast as
it can ask.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

PROBES = frozenset({"/livez", "/readyz"})
MAX_WAIT = 1.0


class TokenBucket:
    """``rate`` tokens a second, up to ``burst``; ``reserve`` says how long to wait for one."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = time.monotonic()

    def reserve(self, max_wait: float) -> float | None:
        """Seconds to wait before going ahead (0 = now), or None when that would exceed ``max_wait``."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        wait = (1.0 - self._tokens) / self.rate if self._tokens < 1.0 else 0.0
        if wait > max_wait:
            return None
        self._tokens -= 1.0  # may go negative: later requests queue behind this one
        return wait


class LoadShedder:
    """Pure ASGI middleware: each HTTP request takes a token of its bucket first."""

    def __init__(self, app: Any, rate: float, on_shed: Callable[[], None] = lambda: None) -> None:
        self.app = app
        self.buckets = {"probe": TokenBucket(max(rate, 50.0), max(rate, 50.0)), "other": TokenBucket(rate, rate)}
        self.on_shed = on_shed

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        bucket = self.buckets["probe" if scope.get("path") in PROBES else "other"]
        wait = bucket.reserve(MAX_WAIT)
        if wait is None:
            await asyncio.sleep(MAX_WAIT)
            self.on_shed()
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": b'{"detail":"over the request budget; retry later"}'})
            return
        if wait > 0:
            await asyncio.sleep(wait)
        await self.app(scope, receive, send)
