"""A bounded HTTP flood on loopback for the reliability suite and the api benchmark: N clients
hammering GET routes over keep-alive connections, plus M idle sockets that connect and say
nothing. It stops by itself after ``seconds``; it only ever talks to 127.0.0.1 (from a loopback
source address of its choice with ``source``, so that one test can be several clients)."""

from __future__ import annotations

import http.client
import resource
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class FloodResult:
    requests: int = 0
    errors: int = 0
    refused: int = 0  # 429/503 answers: the server shedding load, as it should
    idle_opened: int = 0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)


def _source(source: str | None) -> tuple[str, int] | None:
    return (source, 0) if source is not None else None


def idle_sockets(port: int, n: int, source: str | None = None) -> list[socket.socket]:
    """Up to ``n`` connections that will never say anything (fewer if the system refuses more)."""
    sockets: list[socket.socket] = []
    for _ in range(n):
        try:
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=2, source_address=_source(source)))
        except OSError:
            break
    return sockets


def get(port: int, path: str, source: str | None = None, timeout: float = 5.0) -> tuple[int, float]:
    """One GET on a new connection: the status and the seconds it took (status 0: no answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=_source(source))
    t0 = time.perf_counter()
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.perf_counter() - t0
    except (OSError, http.client.HTTPException):
        return 0, time.perf_counter() - t0
    finally:
        conn.close()


def raise_fd_limit(needed: int) -> int:
    """Raise this process's soft limit on open files to ``needed`` if the hard limit allows; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def lifetimes(sockets: list[socket.socket], since: float, timeout: float) -> list[float | None]:
    """Waits up to ``timeout`` seconds for the server to close each socket; for each, how long after
    ``since`` (a ``time.monotonic()``) it saw the end of the stream, or None if still open."""
    out: list[float | None] = [None] * len(sockets)
    sel = selectors.DefaultSelector()
    for i, s in enumerate(sockets):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    end = time.monotonic() + timeout
    try:
        while sel.get_map() and (left := end - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:  # reset: closed too
                    data = b""
                if not data:
                    out[key.data] = time.monotonic() - since
                    sel.unregister(s)
    finally:
        sel.close()
    return out


def flood(port: int, seconds: float, clients: int = 50, idle: int = 300,
          paths: tuple[str, ...] = ("/metrics", "/status"), source: str | None = None,
          result: FloodResult | None = None) -> FloodResult:
    res = result if result is not None else FloodResult()
    lock = threading.Lock()
    end = time.monotonic() + seconds
    sockets = idle_sockets(port, idle, source)
    res.idle_opened = len(sockets)

    def client(i: int) -> None:
        conn: http.client.HTTPConnection | None = None
        n = 0
        while time.monotonic() < end:
            path = paths[(i + n) % len(paths)]
            n += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=_source(source))
                t0 = time.perf_counter()
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                dt = time.perf_counter() - t0
                with lock:
                    res.requests += 1
                    res.latencies.append(dt)
                    res.statuses[resp.status] += 1
                    if resp.status in (429, 503):
                        res.refused += 1
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                with lock:
                    res.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.01)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 10)
    for s in sockets:
        s.close()
    return res


@contextmanager
def flooding(port: int, seconds: float, **kwargs: object) -> Iterator[FloodResult]:
    """``flood`` in a background thread for the body of the ``with``; the result fills in as it runs
    and is complete on leaving (which waits for the flood to end)."""
    res = FloodResult()
    thread = threading.Thread(target=flood, args=(port, seconds), kwargs={**kwargs, "result": res}, daemon=True)
    thread.start()
    try:
        yield res
    finally:
        thread.join(seconds + 20)
