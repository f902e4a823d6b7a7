"""Upload metrics, on an injected registry (names as in docs/METRICS.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from daemon.upload.gate import REASONS

# An upload of a multi-GB revision over a slow link takes minutes; validators'
# age limits are 20-80 minutes, so buckets stop at 10 minutes.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class UploadMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.attempts = Counter(
            "minerd_upload_attempts",
            "Upload gate and publisher outcomes",
            ["result"],
            registry=registry,
        )
        self.blocked = Counter(
            "minerd_upload_blocked", "Uploads refused by the gate, by reason", ["reason"], registry=registry
        )
        self.last_timestamp = Gauge(
            "minerd_last_upload_timestamp_seconds",
            "Unix time the last revision was published (LATEST written)",
            registry=registry,
        )
        self.duration = Histogram(
            "minerd_upload_duration_seconds",
            "Wall time of one publish: serialise, hash, store, pointer",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.bytes = Counter("minerd_upload_bytes", "Bytes of revision files published", registry=registry)
        # Zero-valued series exist from the start, so rate() and alerts see them.
        for result in ("ok", "blocked", "failed"):
            self.attempts.labels(result=result)
        for reason in REASONS:
            self.blocked.labels(reason=reason)


def _state_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    return (
        GaugeMetricFamily(
            "minerd_upload_age_seconds",
            "Seconds since the last revision was published (repo age); absent before the first",
        ),
        GaugeMetricFamily("minerd_upload_stale", "1 when no revision was published within upload.max_age_seconds"),
        GaugeMetricFamily("minerd_upload_in_progress", "1 while a revision is being published"),
    )


class UploadStateCollector(Collector):
    """Age and staleness read at scrape time, so they grow between uploads."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # The names, so the registry refuses a clash at registration.
        yield from _state_families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self._read()
        age, stale, in_progress = _state_families()
        if s["age_seconds"] is not None:
            age.add_metric([], s["age_seconds"])
        stale.add_metric([], 1.0 if s["stale"] else 0.0)
        in_progress.add_metric([], float(s["in_progress"]))
        yield from (age, stale, in_progress)
