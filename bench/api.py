"""Benchmark `api`: what serving the monitoring API costs the training loop.

1. Training throughput with the API serving and a client thread scraping
   ``/metrics`` and ``/status`` 10 times a second, over throughput with the API
   off (goal >= 0.97). Off and on rounds alternate so that load from other
   processes on a shared machine hits both alike; the ratio is the median of
   the per-pair ratios. ``cpu_ratio`` is the same over CPU seconds of this
   whole process (server and client threads included): steady under other
   processes' load, and pessimistic, as if no spare core took the API's work.
   ``modelled_ratio`` = 1 - (CPU per scrape round x 10 Hz), with the CPU per
   request measured while training is idle: the floor on a machine with no
   spare core, free of other processes' noise.
2. p50/p99 latency of ``/metrics`` and of ``/status``, each requested at
   50 requests/s on a keep-alive connection while training runs (goal p99
   <= 20 ms).

The client is a thread of this process, as asked: it competes with training
for the GIL, so both numbers are pessimistic next to an outside Prometheus.

The training is pluggable: a ``Workload`` builds a trainer on the given
``MinerState`` and registry and returns a callable that runs N inner steps,
updating the state and metrics as the miner does; ``trainer_workload``, the
default, is the real two-tower trainer.
"""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch
from prometheus_client import CollectorRegistry

from api.app import create_app
from api.server import ApiServer
from daemon.config import ApiConfig, WatchdogConfig
from daemon.engine.protocols import EvalResult
from daemon.logsetup import configure_logging
from daemon.run.local import cpu_run
from daemon.state import MinerState

TrainSteps = Callable[[int], None]
Workload = Callable[[MinerState, CollectorRegistry], TrainSteps]

SCRAPE_HZ = 10.0  # throughput phase: /metrics and /status, each 10 times a second
LATENCY_RPS = 50.0  # latency phase: per route


class Client(threading.Thread):
    """GETs ``paths`` at ``hz`` rounds a second on one keep-alive connection; records latencies."""

    def __init__(self, port: int, paths: tuple[str, ...], hz: float, seconds: float | None = None) -> None:
        super().__init__(name="bench-client", daemon=True)
        self._port = port
        self._paths = paths
        self._interval = 1.0 / hz
        self._seconds = seconds
        self._halt = threading.Event()
        self.latencies: dict[str, list[float]] = {p: [] for p in paths}
        self.errors = 0

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=10)
        start = time.perf_counter()
        i = 0
        while not self._halt.is_set():
            due = start + i * self._interval
            if self._seconds is not None and due - start >= self._seconds:
                break
            delay = due - time.perf_counter()
            if delay > 0 and self._halt.wait(delay):
                break
            for path in self._paths:
                t0 = time.perf_counter()
                try:
                    conn.request("GET", path)
                    resp = conn.getresponse()
                    resp.read()
                    ok = resp.status == 200
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=10)
                    ok = False
                if ok:
                    self.latencies[path].append((time.perf_counter() - t0) * 1000.0)
                else:
                    self.errors += 1
            i += 1
        conn.close()


# The latency client as a separate process, as Prometheus is: it measures what
# a scraper sees without its own Python work competing for this process's GIL.
_EXTERNAL_CLIENT = """
import http.client, json, sys, time
port, path, rps, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
out, errors, interval = [], 0, 1.0 / rps
start = time.perf_counter()
for i in range(int(seconds * rps)):
    delay = start + i * interval - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
    t0 = time.perf_counter()
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        ok = resp.status == 200
    except (OSError, http.client.HTTPException):
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        ok = False
    if ok:
        out.append((time.perf_counter() - t0) * 1000.0)
    else:
        errors += 1
print(json.dumps({"latencies": out, "errors": errors}))
"""


def _external_latencies(port: int, path: str, seconds: float, train: TrainSteps, chunk: int) -> tuple[list[float], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _EXTERNAL_CLIENT, str(port), path, str(LATENCY_RPS), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    while proc.poll() is None:
        train(chunk)
    out, _ = proc.communicate()
    data = json.loads(out)
    return data["latencies"], data["errors"]


def _serve(state: MinerState, registry: CollectorRegistry) -> ApiServer:
    # A budget above the rates measured here: this measures what serving costs, not the shedding.
    cfg = ApiConfig(port=0, requests_per_second=1000)
    server = ApiServer(create_app(state, registry, cfg, WatchdogConfig()), cfg)
    server.start()
    return server


class Rate:
    """Steps per wall second, and per CPU second of this whole process."""

    def __init__(self, steps: int, wall: float, cpu: float) -> None:
        self.per_wall = steps / wall
        self.per_cpu = steps / cpu if cpu > 0 else float("nan")


def _steps_per_second(train: TrainSteps, seconds: float, chunk: int) -> Rate:
    steps = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while True:
        train(chunk)
        steps += chunk
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return Rate(steps, elapsed, time.process_time() - c0)


def _with_api(
    state: MinerState, registry: CollectorRegistry, train: TrainSteps, seconds: float, chunk: int
) -> tuple[Rate, Client]:
    """Throughput while the API serves and a client thread scrapes /metrics and /status."""
    server = _serve(state, registry)
    assert server.port is not None
    client = Client(server.port, ("/metrics", "/status"), SCRAPE_HZ)
    client.start()
    try:
        return _steps_per_second(train, seconds, chunk), client
    finally:
        client.stop()
        server.stop(5)


def _cpu_ms_per_request(port: int, path: str, n: int) -> float:
    """CPU of this process (server and client) per request, with training idle."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(20):
        conn.request("GET", path)
        conn.getresponse().read()
    c0 = time.process_time()
    for _ in range(n):
        conn.request("GET", path)
        conn.getresponse().read()
    conn.close()
    return (time.process_time() - c0) * 1000.0 / n


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[k]


def run(workload: Workload, quick: bool) -> dict[str, float]:
    rounds, round_s, latency_s = (12, 1.5, 6.0) if quick else (60, 2.0, 30.0)
    state = MinerState(task="bench", device="cpu")
    registry = CollectorRegistry()
    train = workload(state, registry)

    # Warm-up, and a chunk size that keeps each train() call near 50 ms.
    train(3)
    t0 = time.perf_counter()
    train(10)
    step_s = (time.perf_counter() - t0) / 10
    chunk = max(1, int(0.05 / step_s))
    _steps_per_second(train, 1.0, chunk)
    print(
        f"api benchmark: {'quick' if quick else 'full'}, step {step_s * 1000:.1f} ms, "
        f"torch threads {torch.get_num_threads()}"
    )

    server = _serve(state, registry)
    assert server.port is not None
    try:
        cost = {path: _cpu_ms_per_request(server.port, path, 300) for path in ("/metrics", "/status")}
    finally:
        server.stop(5)
    # CPU the scraping takes from a training loop that had no spare core at all.
    modelled = 1.0 - SCRAPE_HZ * sum(cost.values()) / 1000.0
    print(
        f"CPU per request (server + client): /metrics {cost['/metrics']:.2f} ms, "
        f"/status {cost['/status']:.2f} ms -> at {SCRAPE_HZ:g} Hz, modelled ratio without a spare core "
        f"{modelled:.3f}"
    )
    print(f"{'round':>5} {'off steps/s':>12} {'on steps/s':>11} {'ratio':>7} {'cpu ratio':>10} {'scrapes':>8}")
    ratios, cpu_ratios = [], []
    scrape_errors = 0
    for r in range(rounds):
        # ABBA order: a load that drifts during a pair hits off and on alike.
        if r % 2 == 0:
            off = _steps_per_second(train, round_s, chunk)
            on, client = _with_api(state, registry, train, round_s, chunk)
        else:
            on, client = _with_api(state, registry, train, round_s, chunk)
            off = _steps_per_second(train, round_s, chunk)
        scrape_errors += client.errors
        ratios.append(on.per_wall / off.per_wall)
        cpu_ratios.append(on.per_cpu / off.per_cpu)
        print(
            f"{r + 1:>5} {off.per_wall:>12.1f} {on.per_wall:>11.1f} {ratios[-1]:>7.3f} {cpu_ratios[-1]:>10.3f} "
            f"{len(client.latencies['/metrics']):>8}"
        )
    ratio = statistics.median(ratios)

    server = _serve(state, registry)
    assert server.port is not None
    latency: dict[tuple[str, str], list[float]] = {}
    try:
        for path in ("/metrics", "/status"):
            values, errors = _external_latencies(server.port, path, latency_s, train, chunk)
            latency[("process", path)] = values
            scrape_errors += errors
            client = Client(server.port, (path,), LATENCY_RPS, seconds=latency_s)
            client.start()
            while client.is_alive():
                train(chunk)
            latency[("thread", path)] = client.latencies[path]
            scrape_errors += client.errors
    finally:
        server.stop(5)

    print(f"{'client':<8} {'route':<9} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for (kind, path), values in latency.items():
        p50, p99 = _percentile(values, 50), _percentile(values, 99)
        top = max(values, default=float("nan"))
        print(f"{kind:<8} {path:<9} {len(values):>6} {p50:>8.2f} {p99:>8.2f} {top:>8.2f}")
    if scrape_errors:
        print(f"client errors: {scrape_errors}")
    res = {"throughput_ratio": ratio, "cpu_ratio": statistics.median(cpu_ratios), "modelled_ratio": modelled}
    for kind, prefix in (("process", ""), ("thread", "thread_")):
        for path in ("/metrics", "/status"):
            for q in (50, 99):
                res[f"{prefix}{path[1:]}_p{q}_ms"] = _percentile(latency[(kind, path)], q)
    return res


def trainer_workload(state: MinerState, registry: CollectorRegistry) -> TrainSteps:
    """The real two-tower trainer (a mid-sized corpus and model), its metrics on ``registry``."""
    import tempfile

    tmp = tempfile.mkdtemp(prefix="bench-api-")
    run = cpu_run(
        ["train.task=twotower", "twotower.corpus=synthetic", f"paths.state_dir={tmp}",
         "twotower.num_docs=50000", "twotower.eval_queries=100",
         "twotower.hidden_dim=512", "mining.enabled=false", "upload.enabled=false", "telemetry.log_every=1"],
        state=state, registry=registry,
    ).run
    trainer = run.trainer
    state.phase = "training"

    def no_evaluation(*args: object) -> EvalResult:
        return EvalResult({}, "evaluation left out by the benchmark")

    # The task's own seam: an end-of-epoch evaluation (a second or so) falling in one round
    # would swing that round's ratio.
    run.task.evaluate = no_evaluation  # type: ignore[method-assign, assignment]

    def run_steps(n: int) -> None:
        for _ in range(n):
            trainer.inner_step()

    return run_steps


def main(quick: bool, workload: Workload | None = None) -> None:
    configure_logging("console", "warning")
    torch.set_num_threads(1)
    res = run(workload or trainer_workload, quick)
    first = ("throughput_ratio", "metrics_p99_ms", "status_p99_ms")
    keys = [*first, *(k for k in res if k not in first)]
    print("RESULT api " + " ".join(f"{k}={res[k]:.3f}" if k.endswith("ratio") else f"{k}={res[k]:.2f}" for k in keys))


if __name__ == "__main__":
    main("--quick" in sys.argv[1:])
