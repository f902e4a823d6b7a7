"""The ``minerd_mining_*`` metrics of docs/METRICS.md, on an injected registry."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

SOURCES = ("fresh", "reused", "fallback")
FILTER_REASONS = ("ratio", "duplicate")

# One FAISS call: ~5 ms (a few hundred queries, small index) to seconds (qbatch
# 2048 on a 200k flat index on one thread is ~1-2 s); 30 s means it cannot keep up.
SEARCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class QueueDepths(NamedTuple):
    in_q: int
    out_q: int
    fifo: int


def _queue_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
    return (
        GaugeMetricFamily(
            "minerd_mining_queue_depth",
            "Mining queues: in = batches submitted and not yet searched, out = mined results not yet used",
            labels=["queue"],
        ),
        GaugeMetricFamily(
            "minerd_mining_fifo_depth", "Batches submitted for mining and not yet trained (the alignment FIFO)"
        ),
    )


class _QueueCollector(Collector):
    """Queue depths read from the miner at scrape time."""

    def __init__(self, read: Callable[[], QueueDepths]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        # The names, so the registry refuses a clash at registration.
        yield from _queue_families()

    def collect(self) -> Iterable[Metric]:
        depths = self._read()
        queue, fifo = _queue_families()
        queue.add_metric(["in"], depths.in_q)
        queue.add_metric(["out"], depths.out_q)
        fifo.add_metric([], depths.fifo)
        yield from (queue, fifo)


class MiningMetrics:
    """Counters and the histogram, updated where the event happens; gauges via a collector."""

    def __init__(self, registry: CollectorRegistry, depths: Callable[[], QueueDepths]) -> None:
        self.batches = Counter(
            "minerd_mining_batches",
            "Mining-epoch steps by where their negatives came from",
            ["source"],
            registry=registry,
        )
        for source in SOURCES:
            self.batches.labels(source=source)
        self.search_seconds = Histogram(
            "minerd_mining_search_seconds",
            "Wall time of one FAISS search call",
            buckets=SEARCH_BUCKETS,
            registry=registry,
        )
        self.index_refreshes = Counter(
            "minerd_mining_index_refreshes", "FAISS index rebuilds swapped in", registry=registry
        )
        self.errors = Counter(
            "minerd_mining_errors",
            "Errors inside the miner thread (failed searches or builds, or the thread dying)",
            registry=registry,
        )
        self.filtered = Counter(
            "minerd_mining_filtered",
            "Mined candidates dropped as likely false negatives: scoring above mining.max_pos_ratio times the "
            "query's positive (ratio), or holding the positive's very content (duplicate)",
            ["reason"],
            registry=registry,
        )
        for reason in FILTER_REASONS:
            self.filtered.labels(reason=reason)
        registry.register(_QueueCollector(depths))
