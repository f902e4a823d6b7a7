"""The API's request budget (a token bucket per class of route and client address, waiting first,
429 after; a bound on requests in flight that spares the probes) and its connection bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from api.connections import ConnectionGuard
from api.limits import CLIENT_SHARE, MAX_WAIT, OVERFLOW, Budget, LoadShedder, TokenBucket, client_key, route_class


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


async def _ok(scope, receive, send):  # type: ignore[no-untyped-def]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _statuses(shedder: LoadShedder, requests: list[tuple[str, str]]) -> tuple[list[int], float]:
    """Runs the (client address, path) requests at once; their statuses in order, and the seconds taken."""

    async def one(host: str, path: str) -> int:
        got: list[int] = []

        async def send(message):  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.start":
                got.append(message["status"])

        await shedder({"type": "http", "path": path, "client": (host, 40000)}, None, send)
        return got[0]

    async def main() -> tuple[list[int], float]:
        t0 = time.monotonic()
        out = await asyncio.gather(*(one(h, p) for h, p in requests))
        return list(out), time.monotonic() - t0

    return asyncio.run(main())


class TestBudgetsPerClientAndRoute:
    """Each client address has its own bucket in each class of route, under a ceiling for the class."""

    def test_classes(self) -> None:
        assert [route_class(p) for p in ("/livez", "/readyz", "/metrics", "/control/pause", "/status",
                                         "/diagnostics", "/docs", "/metrics/")] == [
            "probe", "probe", "metrics", "control", "other", "other", "other", "other"]

    def test_a_hammering_client_leaves_another_its_budget(self) -> None:
        shedder = LoadShedder(_ok, rate=2)
        hammer = [("10.0.0.1", "/status")] * 12
        statuses, seconds = _statuses(shedder, [*hammer, ("10.0.0.2", "/status")])
        assert statuses[-1] == 200
        assert statuses[:-1].count(429) >= 8  # 2 at once, about 2 more within the second of waiting
        assert seconds == pytest.approx(MAX_WAIT, abs=0.5)

    def test_routes_have_separate_budgets(self) -> None:
        shedder = LoadShedder(_ok, rate=2, metrics_rate=3, control_rate=1)
        b = shedder.budgets
        assert (b["other"].rate, b["metrics"].rate, b["control"].rate, b["probe"].rate) == (2, 3, 1, 50)
        statuses, _ = _statuses(shedder, [("10.0.0.1", "/status")] * 10
                                + [("10.0.0.1", "/metrics"), ("10.0.0.1", "/control/pause"), ("10.0.0.1", "/livez")])
        assert statuses[-3:] == [200, 200, 200]
        assert 429 in statuses[:10]

    def test_the_class_has_a_ceiling(self) -> None:
        budget = Budget(rate=1, share=CLIENT_SHARE)
        waits = [budget.reserve(f"10.0.0.{i}", 0.0) for i in range(CLIENT_SHARE + 2)]
        assert waits[:CLIENT_SHARE] == [0.0] * CLIENT_SHARE
        assert waits[CLIENT_SHARE:] == [None, None]  # each has its own token, but the class is spent

    def test_a_refused_request_takes_nothing(self) -> None:
        budget = Budget(rate=1)
        assert budget.reserve("a", 0.0) == 0.0
        assert budget.reserve("a", 0.0) is None
        assert budget.total.wait(time.monotonic()) == 0.0  # the ceiling still holds the other tokens

    def test_a_rate_under_one_a_second_serves(self) -> None:
        assert Budget(rate=0.2).reserve("a", 0.0) == 0.0

    def test_ipv6_clients_by_their_64(self) -> None:
        a = client_key({"client": ("2001:db8::1", 1)})
        assert a == client_key({"client": ("2001:db8::ffff:1", 2)}) == "2001:db8::/64"
        assert client_key({"client": ("192.0.2.7", 3)}) == "192.0.2.7"
        assert client_key({}) == ""

    def test_the_table_of_clients_is_bounded(self) -> None:
        budget = Budget(rate=1000, max_clients=8)
        for i in range(8):
            assert budget.reserve(f"10.0.0.{i}", 0.0) == 0.0
        time.sleep(0.01)  # the first eight refill to full: forgotten at the next newcomer
        assert budget.reserve("10.0.1.1", 0.0) == 0.0
        assert len(budget.clients) == 1
        budget = Budget(rate=1, max_clients=4, share=100)
        for i in range(10):
            budget.reserve(f"10.0.0.{i}", 1.0)
        assert len(budget.clients) <= 5 and OVERFLOW in budget.clients  # the rest share one bucket


class TestRequestsInFlight:
    """Past max_in_flight, requests other than the probes get 503 at once; the probes are never counted or refused."""

    def test_probes_keep_their_reserve(self) -> None:
        shedder = LoadShedder(_ok, rate=1, max_in_flight=3)
        requests = [("10.0.0.1", "/status")] * 4 + [("10.0.0.2", "/metrics")] * 2 + [("10.0.0.3", "/livez")] * 5
        statuses, _ = _statuses(shedder, requests)
        # The first is served at once; the next three wait (one token a second): no room for /metrics.
        assert statuses[0] == 200 and statuses[4:6] == [503, 503]
        assert statuses[6:] == [200] * 5
        assert shedder.in_flight == 0


class _Conn:
    """A stand-in for a connection: what the guard asks of one."""

    def __init__(self, guard: ConnectionGuard, unread: int = 0) -> None:
        self.guard, self._unread, self.closed, self.refused = guard, unread, False, False

    def unread(self) -> int:
        return self._unread

    def drop(self) -> None:
        self.closed = True
        self.guard.open.discard(self)  # type: ignore[arg-type]
        self.guard.waiting.pop(self, None)  # type: ignore[call-overload]
        self.guard.busy.pop(self, None)  # type: ignore[call-overload]

    def refuse(self) -> None:
        self.refused = True
        self.drop()


class _Clock:
    """Time that moves only when a test says so, and the timers set on it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def __call__(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.timers.append((self.now + delay, callback))

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = sorted((t for t in self.timers if t[0] <= self.now), key=lambda t: t[0])
        self.timers = [t for t in self.timers if t[0] > self.now]
        for _, callback in due:
            callback()


class TestConnectionGuard:
    """Past max_connections a newcomer gets in and the longest-waiting idle connection makes room,
    once it has waited past its grace."""

    @pytest.fixture
    def clock(self) -> _Clock:
        return _Clock()

    @staticmethod
    def _guard(clock: _Clock) -> ConnectionGuard:
        guard = ConnectionGuard(header_timeout=5, max_connections=4, clock=clock)
        assert guard.grace == 0.5
        return guard

    @staticmethod
    def _connect(guard: ConnectionGuard, clock: _Clock, unread: int = 0, busy: bool = False) -> _Conn:
        c = _Conn(guard, unread)
        if busy:
            guard.busy[c] = None  # type: ignore[index]
        else:
            guard.waiting[c] = clock()  # type: ignore[index]
        guard.admit(c, clock.call_later)  # type: ignore[arg-type]
        return c

    def test_the_oldest_idle_makes_room(self, clock: _Clock) -> None:
        guard = self._guard(clock)
        idle = [self._connect(guard, clock) for _ in range(4)]
        clock.advance(1.0)
        newcomer = self._connect(guard, clock)
        assert [c.closed for c in idle] == [True, False, False, False] and not newcomer.closed
        assert len(guard.open) == 4 and guard.evicted == 1

    def test_a_connection_with_its_request_unread_is_skipped(self, clock: _Clock) -> None:
        guard = self._guard(clock)
        pending = self._connect(guard, clock, unread=40)
        idle = [self._connect(guard, clock) for _ in range(3)]
        clock.advance(1.0)
        self._connect(guard, clock)
        assert not pending.closed and idle[0].closed

    def test_a_connection_within_its_grace_is_not_closed_and_room_is_made_after_it(self, clock: _Clock) -> None:
        # A client's request can reach the server a little after its connection does: a probe
        # accepted in that gap looks idle, and must not be closed for it.
        guard = self._guard(clock)
        old = [self._connect(guard, clock) for _ in range(2)]
        clock.advance(0.3)
        young = [self._connect(guard, clock) for _ in range(2)]
        clock.advance(0.3)  # the old ones are 0.6 s into their wait, the young ones 0.3 s
        self._connect(guard, clock)
        self._connect(guard, clock)
        assert [c.closed for c in old + young] == [True, True, False, False]
        newcomers = [self._connect(guard, clock) for _ in range(2)]
        assert not any(c.closed for c in young + newcomers) and len(guard.open) == 6
        assert len(clock.timers) == 1  # one sweep, however many newcomers
        clock.advance(0.25)  # the young ones' grace is over: they make room, nobody else does
        assert [c.closed for c in young] == [True, True] and len(guard.open) == 4
        assert not any(c.closed for c in newcomers) and guard.evicted == 4 and not clock.timers

    def test_the_sweep_comes_back_for_connections_still_young(self, clock: _Clock) -> None:
        guard = self._guard(clock)
        first = self._connect(guard, clock)
        clock.advance(0.3)
        later = [self._connect(guard, clock) for _ in range(3)]
        clock.advance(0.1)
        extra = [self._connect(guard, clock) for _ in range(2)]
        assert len(guard.open) == 6 and not any(c.closed for c in [first, *later, *extra])
        clock.advance(0.15)  # the first is past its grace, the later ones are not
        assert first.closed and not any(c.closed for c in later) and len(guard.open) == 5
        assert len(clock.timers) == 1
        clock.advance(0.3)
        assert [c.closed for c in later] == [True, False, False] and len(guard.open) == 4
        assert not any(c.closed for c in extra) and not clock.timers

    def test_at_twice_the_bound_the_grace_is_set_aside(self, clock: _Clock) -> None:
        guard = self._guard(clock)
        idle = [self._connect(guard, clock) for _ in range(8)]
        assert len(guard.open) == 8 and not any(c.closed for c in idle)
        newcomer = self._connect(guard, clock, unread=40)
        assert idle[0].closed and not newcomer.refused and guard.refused == 0 and len(guard.open) == 8

    def test_at_twice_the_bound_a_request_in_flight_makes_room_then_the_newcomer_is_refused(
            self, clock: _Clock) -> None:
        guard = self._guard(clock)
        busy = [self._connect(guard, clock, busy=True) for _ in range(2)]
        pending = [self._connect(guard, clock, unread=40) for _ in range(6)]
        assert len(guard.open) == 8 and not any(c.closed for c in busy + pending)
        self._connect(guard, clock, unread=40)
        assert busy[0].closed and not busy[1].closed
        self._connect(guard, clock, unread=40)
        assert busy[1].closed
        last = self._connect(guard, clock, unread=40)
        assert last.refused and guard.refused == 1 and len(guard.open) == 8
