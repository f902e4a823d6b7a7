"""What the fault-tolerant outer sync did, read at scrape time and by /status."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class FtStats:
    def __init__(self, lighthouse: str, replica_group: int) -> None:
        self._lock = threading.Lock()
        self.lighthouse = lighthouse
        self.replica_group = replica_group
        self.phase = "connecting"  # connecting, waiting_for_lighthouse, joining, training
        self.participants = 0
        self.recoveries = 0
        self.commits = 0
        self.failures = 0
        self.last_sync_seconds: float | None = None
        self.last_recovery_seconds: float | None = None
        self.last_error: str | None = None
        self.last_commit_time: float | None = None

    def set_phase(self, phase: str, error: str | None = None) -> None:
        with self._lock:
            self.phase = phase
            if error:
                self.last_error = error

    def committed(self, participants: int, seconds: float) -> None:
        with self._lock:
            self.phase = "training"
            self.participants = participants
            self.commits += 1
            self.last_sync_seconds = seconds
            self.last_commit_time = time.time()

    def failed(self, error: str) -> None:
        with self._lock:
            self.failures += 1
            self.last_error = error

    def recovered(self, seconds: float) -> None:
        with self._lock:
            self.recoveries += 1
            self.last_recovery_seconds = seconds

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "lighthouse": self.lighthouse,
                "replica_group": self.replica_group,
                "phase": self.phase,
                "participants": self.participants,
                "outer_syncs_committed": self.commits,
                "outer_syncs_failed": self.failures,
                "recoveries": self.recoveries,
                "last_sync_seconds": self.last_sync_seconds,
                "last_recovery_seconds": self.last_recovery_seconds,
                "last_commit_time": self.last_commit_time,
                "last_error": self.last_error,
            }


class FtCollector(Collector):
    def __init__(self, stats: FtStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats.status()
        yield GaugeMetricFamily("minerd_ft_participants", "Replica groups in the last committed outer step",
                                value=s["participants"])
        syncs = CounterMetricFamily("minerd_ft_outer_syncs", "Fault-tolerant outer sync attempts, by result",
                                    labels=["result"])
        syncs.add_metric(["committed"], s["outer_syncs_committed"])
        syncs.add_metric(["failed"], s["outer_syncs_failed"])
        yield syncs
        yield CounterMetricFamily("minerd_ft_recoveries", "Times this replica took its state from a live peer",
                                  value=s["recoveries"])
        if s["last_sync_seconds"] is not None:
            yield GaugeMetricFamily("minerd_ft_outer_sync_seconds",
                                    "Seconds of the last committed outer sync (quorum, all-reduce, commit)",
                                    value=s["last_sync_seconds"])
        yield GaugeMetricFamily("minerd_ft_waiting", "1 while waiting for the lighthouse or a quorum to join",
                                value=1.0 if s["phase"] in ("connecting", "waiting_for_lighthouse", "joining")
                                else 0.0)


def register(registry: CollectorRegistry, stats: FtStats) -> None:
    registry.register(FtCollector(stats))
