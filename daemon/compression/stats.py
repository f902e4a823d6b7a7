"""What the codec did, per use (the upload artifact, the outer sync), read at scrape time.

The publisher thread and the training thread each write their own use's counters; the
scrape and ``/status`` read them. Names as in docs/METRICS.md.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

USES = ("upload", "outer_sync")


@dataclass
class UseStats:
    count: int = 0  # artifacts written or outer syncs done
    bytes_total: int = 0  # compressed bytes (sent or written)
    dense_bytes_total: int = 0  # what the same tensors take as float32
    last_bytes: int = 0
    last_ratio: float = 0.0
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0


class CompressionStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._uses: dict[str, UseStats] = {}

    def record(self, use: str, nbytes: int, dense_bytes: int, encode_s: float, decode_s: float) -> None:
        with self._lock:
            u = self._uses.setdefault(use, UseStats())
            u.count += 1
            u.bytes_total += nbytes
            u.dense_bytes_total += dense_bytes
            u.last_bytes = nbytes
            u.last_ratio = dense_bytes / nbytes if nbytes else 0.0
            u.encode_seconds += encode_s
            u.decode_seconds += decode_s

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {use: asdict(u) for use, u in self._uses.items()}

    def status(self) -> dict[str, Any]:
        """The /status section: per use, with the ratio rounded for people."""
        out = {}
        for use, u in self.snapshot().items():
            out[use] = {**u, "last_ratio": round(u["last_ratio"], 2)}
        return out


def _families() -> tuple[CounterMetricFamily, CounterMetricFamily, GaugeMetricFamily, GaugeMetricFamily,
                         CounterMetricFamily]:
    return (
        CounterMetricFamily("minerd_compressed_bytes", "Compressed pseudo-gradient bytes written or sent",
                            labels=["use"]),
        CounterMetricFamily("minerd_compression_dense_bytes",
                            "What the same pseudo-gradients take uncompressed (float32)", labels=["use"]),
        GaugeMetricFamily("minerd_compressed_last_bytes",
                          "Bytes of the last artifact (use=upload) or outer sync (use=outer_sync)", labels=["use"]),
        GaugeMetricFamily("minerd_compression_ratio", "Dense over compressed bytes, last one", labels=["use"]),
        CounterMetricFamily("minerd_compression_seconds", "Time spent encoding and decoding", labels=["use", "op"]),
    )


class CompressionCollector(Collector):
    def __init__(self, stats: CompressionStats) -> None:
        self._stats = stats

    def describe(self) -> Iterator[Metric]:
        # The names, so the registry refuses a clash at registration.
        yield from _families()

    def collect(self) -> Iterator[Metric]:
        snap = self._stats.snapshot()
        sent, dense, last, ratio, secs = _families()
        for use, u in sorted(snap.items()):
            sent.add_metric([use], u["bytes_total"])
            dense.add_metric([use], u["dense_bytes_total"])
            last.add_metric([use], u["last_bytes"])
            ratio.add_metric([use], u["last_ratio"])
            secs.add_metric([use, "encode"], u["encode_seconds"])
            secs.add_metric([use, "decode"], u["decode_seconds"])
        yield from (sent, dense, last, ratio, secs)


def register(registry: CollectorRegistry, stats: CompressionStats) -> None:
    registry.register(CompressionCollector(stats))
