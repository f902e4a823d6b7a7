"""The retrieval evaluation per ranker, as Prometheus sees it: the towers, BM25 over the same
tokens, and their reciprocal-rank fusion, each a value of the ``ranker`` label.

Read from the last evaluation (``MinerState.eval``) at scrape time: the towers' figures
under their own names (``recall_at_10``, which the contract's unlabelled gauges export too),
BM25's and the fusion's under ``bm25_`` and ``hybrid_``.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from daemon.state import MinerState

RANKERS = {"towers": "", "bm25": "bm25_", "hybrid": "hybrid_"}
FIGURES = {
    "recall_at_1": ("minerd_eval_ranker_recall_at_1", "Held-out recall@1 of each ranker at the last evaluation"),
    "recall_at_10": ("minerd_eval_ranker_recall_at_10", "Held-out recall@10 of each ranker at the last evaluation"),
    "mrr_at_10": ("minerd_eval_ranker_mrr_at_10", "Held-out MRR@10 of each ranker at the last evaluation"),
}


class RankerCollector(Collector):
    def __init__(self, state: MinerState) -> None:
        self._state = state

    def describe(self) -> Iterator[Metric]:
        for name, doc in FIGURES.values():
            yield GaugeMetricFamily(name, doc, labels=["ranker"])

    def collect(self) -> Iterator[Metric]:
        values = dict(self._state.eval)
        for figure, (name, doc) in FIGURES.items():
            family = GaugeMetricFamily(name, doc, labels=["ranker"])
            for ranker, prefix in RANKERS.items():
                if f"{prefix}{figure}" in values:
                    family.add_metric([ranker], float(values[f"{prefix}{figure}"]))
            if family.samples:
                yield family
