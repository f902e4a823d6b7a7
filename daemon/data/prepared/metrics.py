"""What the shard reader shows: Prometheus metrics read at scrape time, and a /status section.

Seconds the trainer waited for data are the core's ``minerd_data_wait_seconds_total``; each
fetch's seconds go to the histogram ``minerd_data_fetch_seconds`` as it ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from daemon.data.prepared.cache import ShardReader
from daemon.data.prepared.dataset import Location

_FAMILIES = (
    ("gauge", "minerd_data_shards_cached", "Shards of the training dataset on this machine's disk (read in place: "
     "the ones opened)"),
    ("gauge", "minerd_data_cache_bytes", "Bytes of those shards"),
    ("counter", "minerd_data_fetch_bytes", "Bytes of shards fetched into the cache"),
    ("counter", "minerd_data_refetches", "Shards fetched again because they did not match the index"),
)


def fetch_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram("minerd_data_fetch_seconds", "Seconds each shard fetch into the cache took",
                     buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=registry)


class DataCollector(Collector):
    def __init__(self, reader: ShardReader) -> None:
        self.reader = reader

    def _families(self, values: tuple[float, ...]) -> Iterator[Any]:
        for (kind, name, text), value in zip(_FAMILIES, values, strict=True):
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(name, text, value=value)

    def describe(self) -> Iterator[Any]:
        return self._families((0,) * len(_FAMILIES))

    def collect(self) -> Iterator[Any]:
        shards, size = self.reader.cached()
        s = self.reader.stats
        return self._families((shards, size, s.fetch_bytes, s.refetches))


def data_status(loc: Location, reader: ShardReader, replica: int, replicas: int) -> dict[str, Any]:
    shards, size = reader.cached()
    s = reader.stats
    return {
        "dataset": loc.storage.describe(),
        "digest": loc.index.digest,
        "train_tokens": loc.index.tokens("train"),
        "eval_tokens": loc.index.tokens("eval"),
        "shards": len(loc.index.shards),
        "replica": replica,
        "replicas": replicas,
        "shards_cached": shards,
        "cache_bytes": size,
        "fetches": s.fetches,
        "fetch_seconds": round(s.fetch_seconds, 3),
        "fetch_bytes": s.fetch_bytes,
        "refetches": s.refetches,
    }


class ReaderClosed:
    """Stops the shard cache's fetch thread when the run stops."""

    name = "shard reader"

    def __init__(self, reader: ShardReader) -> None:
        self.reader = reader

    def start(self) -> None:
        pass

    def stop(self, timeout: float) -> object:
        self.reader.close()
        return None
