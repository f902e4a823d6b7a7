"""The API's request budget: a token bucket per class of route, waiting first, 429 after."""

from __future__ import annotations

import asyncio
import time

import pytest

from api.limits import MAX_WAIT, LoadShedder, TokenBucket


class TestTokenBucket:
    """Bursts up to the bucket, then one token each 1/rate seconds; waits beyond max_wait refused."""

    def test_burst_then_waits(self) -> None:
        b = TokenBucket(rate=10, burst=3)
        assert [b.reserve(1.0) for _ in range(3)] == [0.0, 0.0, 0.0]
        waits = [b.reserve(1.0) for _ in range(3)]
        assert all(w is not None for w in waits)
        assert waits == sorted(waits) and 0.05 < waits[0] <= 0.1 + 1e-6  # type: ignore[operator]
        assert b.reserve(0.01) is None  # the queue is longer than that

    def test_refills_with_time(self) -> None:
        b = TokenBucket(rate=100, burst=1)
        assert b.reserve(0) == 0.0
        time.sleep(0.02)
        assert b.reserve(0) == 0.0


class TestLoadShedder:
    """Over budget, requests wait; past MAX_WAIT they get 429; the probes have their own budget."""

    def test_waits_then_refuses(self) -> None:
        served: list[str] = []

        async def app(scope, receive, send):  # type: ignore[no-untyped-def]
            served.append(scope["path"])
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        shed: list[int] = []
        shedder = LoadShedder(app, rate=2, on_shed=lambda: shed.append(1))
        statuses: list[int] = []

        async def send(message):  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        async def main() -> float:
            t0 = time.monotonic()
            calls = [shedder({"type": "http", "path": "/metrics"}, None, send) for _ in range(8)]
            calls += [shedder({"type": "http", "path": "/livez"}, None, send) for _ in range(8)]
            await asyncio.gather(*calls)
            return time.monotonic() - t0

        seconds = asyncio.run(main())
        assert served.count("/livez") == 8  # the probes' own, larger budget
        assert 2 <= served.count("/metrics") <= 5 and statuses.count(429) == 8 - served.count("/metrics")
        assert len(shed) == statuses.count(429)
        assert seconds == pytest.approx(MAX_WAIT, abs=0.5)
