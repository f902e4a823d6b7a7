"""A bounded HTTP flood on loopback for the reliability suite and the api benchmark: N clients
hammering GET routes over keep-alive connections, plus M idle sockets that connect and say
nothing. It stops by itself after ``seconds``; it only ever talks to 127.0.0.1."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class FloodResult:
    requests: int = 0
    errors: int = 0
    refused: int = 0  # 429/503 answers: the server shedding load, as it should
    idle_opened: int = 0
    latencies: list[float] = field(default_factory=list)


def flood(port: int, seconds: float, clients: int = 50, idle: int = 300,
          paths: tuple[str, ...] = ("/metrics", "/status")) -> FloodResult:
    res = FloodResult()
    lock = threading.Lock()
    end = time.monotonic() + seconds
    sockets: list[socket.socket] = []
    for _ in range(idle):
        try:
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        except OSError:
            break
    res.idle_opened = len(sockets)

    def client(i: int) -> None:
        conn: http.client.HTTPConnection | None = None
        n = 0
        while time.monotonic() < end:
            path = paths[(i + n) % len(paths)]
            n += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                t0 = time.perf_counter()
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                dt = time.perf_counter() - t0
                with lock:
                    res.requests += 1
                    res.latencies.append(dt)
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
