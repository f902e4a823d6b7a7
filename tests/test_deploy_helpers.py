"""The deployment test helpers drive the real Prometheus and pm2, and clean up after themselves.

These run without the miner: Prometheus scrapes a stand-in exporter that serves every docs/METRICS.md
metric from a fresh prometheus_client registry, and pm2 runs a small Python app launched the way
ecosystem.config.js launches the miner (interpreter 'none', SIGINT on stop, kill_timeout).
The integration tests against a running miner reuse the same helpers.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from tests.deploy_tools import (
    DASHBOARD,
    dashboard_targets,
    fill_dashboard_variables,
    free_port,
    pm2_session,
    prometheus_config,
    running_prometheus,
    write_prometheus_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class StandInExporter:
    """Serves the metric names of docs/METRICS.md with plausible, moving values on 127.0.0.1:<port>."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.info = Gauge("minerd_info", "", ["version", "task", "device", "rank"], registry=r)
        self.gauges = {
            n: Gauge(n, "", registry=r)
            for n in (
                "minerd_outer_step", "minerd_inner_step", "minerd_epoch", "minerd_loss",
                "minerd_learning_rate", "minerd_separation_margin", "minerd_last_step_timestamp_seconds",
                "minerd_model_on_accelerator", "minerd_mining_fifo_depth",
                "minerd_last_upload_timestamp_seconds", "minerd_last_checkpoint_timestamp_seconds",
                "minerd_tokens_per_second", "minerd_mfu_ratio", "minerd_eval_loss", "minerd_eval_bits_per_byte",
                "minerd_data_cache_bytes", "minerd_data_shards_cached", "minerd_exchange_round",
                "minerd_exchange_rounds_behind", "minerd_aggregator_round", "minerd_aggregator_held_out_loss",
                "minerd_aggregator_round_seconds",
            )
        }  # fmt: skip
        self.per_device = {
            n: Gauge(n, "", ["device"], registry=r)
            for n in (
                "minerd_gpu_memory_allocated_bytes", "minerd_gpu_memory_reserved_bytes",
                "minerd_gpu_memory_total_bytes", "minerd_gpu_utilization_ratio",
            )
        }  # fmt: skip
        self.counters = {
            n: Counter(n, "", registry=r)
            for n in (
                "minerd_inner_steps", "minerd_samples", "minerd_data_wait_seconds", "minerd_nonfinite_steps",
                "minerd_slow_steps", "minerd_mining_index_refreshes", "minerd_embedding_disk_syncs",
                "minerd_upload_bytes", "minerd_checkpoints", "minerd_mining_errors", "minerd_tokens",
            )
        }  # fmt: skip
        self.queue = Gauge("minerd_mining_queue_depth", "", ["queue"], registry=r)
        self.batches = Counter("minerd_mining_batches", "", ["source"], registry=r)
        self.cache = Counter("minerd_embedding_cache_requests", "", ["tier", "result"], registry=r)
        self.cache_bytes = Gauge("minerd_embedding_cache_bytes", "", ["tier"], registry=r)
        self.attempts = Counter("minerd_upload_attempts", "", ["result"], registry=r)
        self.blocked = Counter("minerd_upload_blocked", "", ["reason"], registry=r)
        self.exchange = Counter("minerd_exchange_submissions", "", ["result"], registry=r)
        self.verdicts = Counter("minerd_aggregator_submissions", "", ["reason"], registry=r)
        buckets = (0.01, 0.1, 1, 10, 60, 600)
        self.step = Histogram("minerd_step_duration_seconds", "", buckets=buckets, registry=r)
        self.search = Histogram("minerd_mining_search_seconds", "", buckets=buckets, registry=r)
        self.upload = Histogram("minerd_upload_duration_seconds", "", buckets=buckets, registry=r)
        self.fetch = Histogram("minerd_data_fetch_seconds", "", buckets=buckets, registry=r)
        self.info.labels("0.1.0", "twotower", "cuda:0", "0").set(1)
        self._stop = threading.Event()
        self._tick_thread = threading.Thread(target=self._run, name="stand-in-exporter", daemon=True)
        self.port = free_port()
        self._server, self._server_thread = start_http_server(self.port, addr="127.0.0.1", registry=r)

    def tick(self, i: int) -> None:
        now = time.time()
        for name, value in {
            "minerd_outer_step": i // 7, "minerd_inner_step": i % 7, "minerd_epoch": i // 20,
            "minerd_loss": 3.4 / (1 + i), "minerd_learning_rate": 2.1e-5, "minerd_separation_margin": 0.05,
            "minerd_last_step_timestamp_seconds": now, "minerd_model_on_accelerator": 1,
            "minerd_mining_fifo_depth": 3, "minerd_last_upload_timestamp_seconds": now - 30,
            "minerd_last_checkpoint_timestamp_seconds": now - 10, "minerd_tokens_per_second": 2000.0,
            "minerd_mfu_ratio": 0.41, "minerd_eval_loss": 5.0 - i / 100, "minerd_eval_bits_per_byte": 2.0 - i / 250,
            "minerd_data_cache_bytes": 3 << 27, "minerd_data_shards_cached": 3, "minerd_exchange_round": i // 5,
            "minerd_exchange_rounds_behind": 0, "minerd_aggregator_round": i // 5,
            "minerd_aggregator_held_out_loss": 4.1 - i / 1000, "minerd_aggregator_round_seconds": 30.0,
        }.items():  # fmt: skip
            self.gauges[name].set(value)
        for name, value in (("allocated", 18e9), ("reserved", 20e9), ("total", 80e9)):
            self.per_device[f"minerd_gpu_memory_{name}_bytes"].labels("cuda:0").set(value)
        self.per_device["minerd_gpu_utilization_ratio"].labels("cuda:0").set(0.95)
        for c in self.counters.values():
            c.inc()
        self.queue.labels("in").set(2)
        self.queue.labels("out").set(3)
        for source in ("fresh", "reused", "fallback"):
            self.batches.labels(source).inc()
        for tier in ("l1", "l2", "l3"):
            self.cache.labels(tier, "hit").inc(9)
            self.cache.labels(tier, "miss").inc()
            self.cache_bytes.labels(tier).set(1 << 20)
        for result in ("ok", "blocked", "failed"):
            self.attempts.labels(result).inc()
        self.blocked.labels("not_on_schedule").inc()
        self.exchange.labels("submitted").inc()
        for reason in ("accepted", "no_improvement"):
            self.verdicts.labels(reason).inc()
        self.fetch.observe(0.8)
        self.step.observe(0.5 + (i % 3))
        self.search.observe(0.02)
        self.upload.observe(1.5)

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(0.2):
            i += 1
            self.tick(i)

    def start(self) -> None:
        self.tick(0)
        self._tick_thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._tick_thread.join(5)
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def exporter() -> Iterator[StandInExporter]:
    e = StandInExporter()
    e.start()
    try:
        yield e
    finally:
        e.stop()


class TestPrometheusHelper:
    """A loopback Prometheus with the deploy config scrapes, evaluates the alerts, and stops by pid."""

    def test_dashboard_queries_and_alert_rules_on_a_real_prometheus(
        self, exporter: StandInExporter, tmp_path: Path
    ) -> None:
        instance = f"127.0.0.1:{exporter.port}"
        config = write_prometheus_config(prometheus_config([instance], scrape_interval="1s"), tmp_path / "cfg")
        with running_prometheus(config, tmp_path / "prom") as prom:
            # 1. the stand-in is scraped and the dashboard's instance variable finds it
            prom.wait_for_series('up{job="minerd"} == 1')
            values = prom.api("label/instance/values", {"match[]": "minerd_info"})
            assert values == [instance]
            # 2. every panel query, filled in as Grafana sends it, returns a series
            dashboard = json.loads(DASHBOARD.read_text())
            time.sleep(3)  # enough scrapes for rate() over a 5 s window
            empty = []
            for title, expr in dashboard_targets(dashboard):
                filled = fill_dashboard_variables(expr, instance=instance, rate_interval="5s")
                if not prom.query(filled):
                    empty.append((title, filled))
            assert empty == []
            # 3. the alert rules load and evaluate without errors against these series
            deadline = time.monotonic() + 15
            while True:
                groups = prom.api("rules")["groups"]
                rules = [r for g in groups for r in g["rules"]]
                if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules):
                    break
                assert time.monotonic() < deadline, rules
                time.sleep(0.5)
            assert len(rules) >= 14
            assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
            pid = prom.proc.pid
        # 4. stopped by its own pid, cleanly
        assert prom.proc.returncode == 0
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


APP = """#!{python}
import signal, sys, time
from pathlib import Path
marker = Path(sys.argv[1])
stopping = False
def on_signal(signum, frame):
    global stopping
    stopping = True
signal.signal(signal.SIGINT, on_signal)
print("Outer Step: 0 | Inner Step: 1 | LR: 0.00002100 | Loss: 3.40 | Step Time: 0.1s | GPU Mem: 0.00GB", flush=True)
while not stopping:
    time.sleep(0.05)
time.sleep(1.0)  # a checkpoint flush that outlasts pm2's default 1.6 s kill_timeout would be cut short
marker.write_text("clean")
sys.exit(0)
"""

ECOSYSTEM = """module.exports = {{ apps: [{{
  name: 'stand_in_miner', script: {script}, args: [{marker}], interpreter: 'none', cwd: {cwd},
  autorestart: true, kill_timeout: 5000, stop_exit_codes: [0, 2], min_uptime: '1s', max_restarts: 3,
  exp_backoff_restart_delay: 100, log_date_format: 'YYYY-MM-DD HH:mm:ss',
}}] }};
"""


class TestPm2Helper:
    """A private pm2 starts an app as our ecosystem file does, stops it with SIGINT, and is killed."""

    def test_start_logs_stop_and_kill(self, tmp_path: Path) -> None:
        app = tmp_path / "app.py"
        app.write_text(APP.format(python=sys.executable))
        app.chmod(0o755)
        marker = tmp_path / "stopped"
        eco = tmp_path / "ecosystem.config.js"
        eco.write_text(
            ECOSYSTEM.format(script=json.dumps(str(app)), marker=json.dumps(str(marker)), cwd=json.dumps(str(tmp_path)))
        )
        with pm2_session() as pm2:
            pm2.run("start", str(eco))
            online = pm2.wait_status("stand_in_miner", "online", timeout=30)
            app_pid = online["pid"]
            daemon_pid = pm2.daemon_pid()
            assert daemon_pid and daemon_pid != app_pid
            deadline = time.monotonic() + 15
            while "Outer Step: 0" not in pm2.logs("stand_in_miner", lines=20):
                assert time.monotonic() < deadline, pm2.logs("stand_in_miner")
                time.sleep(0.3)
            pm2.run("stop", "stand_in_miner")
            stopped = pm2.wait_status("stand_in_miner", "stopped", timeout=15)
            # SIGINT reached the Python process itself (no wrapper), which finished its 1 s flush
            assert marker.read_text() == "clean"
            assert stopped["pm2_env"]["exit_code"] == 0
            home = pm2.home
        # pm2_session ran `pm2 kill` on its own PM2_HOME and removed it
        assert not home.exists()
        assert not _running(daemon_pid)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"
