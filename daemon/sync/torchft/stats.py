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


# Phases in which this replica waits for the lighthouse or for a quorum to join.
_WAITING = ("connecting", "waiting_for_lighthouse", "joining")


def _families() -> tuple[GaugeMetricFamily, CounterMetricFamily, CounterMetricFamily, GaugeMetricFamily,
                         GaugeMetricFamily]:
    return (
        GaugeMetricFamily("minerd_ft_participants", "Replica groups in the last committed outer step"),
        CounterMetricFamily("minerd_ft_outer_syncs", "Fault-tolerant outer sync attempts, by result",
                            labels=["result"]),
        CounterMetricFamily("minerd_ft_recoveries", "Times this replica took its state from a live peer"),
        GaugeMetricFamily("minerd_ft_outer_sync_seconds",
                          "Seconds of the last committed outer sync (quorum, all-reduce, commit)"),
        GaugeMetricFamily("minerd_ft_waiting", "1 while waiting for the lighthouse or a quorum to join"),
    )


class FtCollector(Collector):
    def __init__(self, stats: FtStats) -> None:
        self._stats = stats

    def describe(self) -> Iterator[Metric]:
        # All of them, the sync seconds too though absent before the first commit, so the
        # registry refuses a clash at registration.
        yield from _families()

    def collect(self) -> Iterator[Metric]:
        s = self._stats.status()
        participants, syncs, recoveries, sync_seconds, waiting = _families()
        participants.add_metric([], s["participants"])
        syncs.add_metric(["committed"], s["outer_syncs_committed"])
        syncs.add_metric(["failed"], s["outer_syncs_failed"])
        recoveries.add_metric([], s["recoveries"])
        yield from (participants, syncs, recoveries)
        if s["last_sync_seconds"] is not None:
            sync_seconds.add_metric([], s["last_sync_seconds"])
            yield sync_seconds
        waiting.add_metric([], 1.0 if s["phase"] in _WAITING else 0.0)
        yield waiting


def register(registry: CollectorRegistry, stats: FtStats) -> None:
    registry.register(FtCollector(stats))
