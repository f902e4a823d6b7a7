"""Prometheus export of the embedding store, read at scrape time (docs/METRICS.md names)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from daemon.tasks.twotower.embeddings.store import EmbeddingStore


def _families() -> tuple[CounterMetricFamily, GaugeMetricFamily, CounterMetricFamily]:
    return (
        CounterMetricFamily(
            "minerd_embedding_cache_requests",
            "Embedding cache lookups per tier and result.",
            labels=["tier", "result"],
        ),
        GaugeMetricFamily(
            "minerd_embedding_cache_bytes",
            "Bytes held per embedding tier (l1, l2 in memory; l3 in chunk files).",
            labels=["tier"],
        ),
        CounterMetricFamily(
            "minerd_embedding_disk_syncs",
            "Disk writes of dirty embedding chunks (syncs and eviction write-backs).",
        ),
    )


class EmbeddingCacheCollector(Collector):
    """Per-tier lookups (hit/miss), bytes per tier, and disk syncs of one store.

    Tier requests cascade: every lookup asks L1; L1 misses ask L2; L2 misses ask
    L3 (the chunk files), where a miss is a chunk never written (initial values).
    """

    def __init__(self, store: EmbeddingStore) -> None:
        self._store = store

    def describe(self) -> Iterator[Metric]:
        # The names, so the registry refuses a clash at registration.
        yield from _families()

    def collect(self) -> Iterator[Metric]:
        p = self._store.get_cache_performance()
        requests, size, syncs = _families()
        l1_miss = p["lookups"] - p["l1_hits"]
        l2_miss = l1_miss - p["l2_hits"]
        for tier, hit, miss in (
            ("l1", p["l1_hits"], l1_miss),
            ("l2", p["l2_hits"], l2_miss),
            ("l3", p["l3_hits"], p["l3_misses"]),
        ):
            requests.add_metric([tier, "hit"], hit)
            requests.add_metric([tier, "miss"], miss)
        for tier in ("l1", "l2", "l3"):
            size.add_metric([tier], p[f"{tier}_bytes"])
        syncs.add_metric([], p["disk_syncs"])
        yield from (requests, size, syncs)

