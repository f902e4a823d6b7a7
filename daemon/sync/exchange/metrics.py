"""The exchange miner's metrics, read at scrape time from the miner's own counters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from daemon.sync.exchange.miner import ExchangeMiner

RESULTS = ("submitted", "failed", "dropped", "blocked")


class ExchangeCollector(Collector):
    def __init__(self, miner: ExchangeMiner) -> None:
        self.miner = miner

    def _families(self, live: bool) -> Iterator[Any]:
        m = self.miner
        yield GaugeMetricFamily("minerd_exchange_round", "The global round this miner trains from",
                                value=m.base if live else 0)
        yield GaugeMetricFamily("minerd_exchange_rounds_behind",
                                "Global rounds published past the one this miner trains from",
                                value=m.rounds_behind if live else 0)
        subs = CounterMetricFamily("minerd_exchange_submissions", "Rounds this miner submitted, failed to "
                                   "submit, dropped (the global model had moved on) or blocked by its preview",
                                   labels=["result"])
        for result in RESULTS:
            subs.add_metric([result], m.counts[result] if live else 0)
        yield subs
        p = m.last_preview
        delta = (p.loss_before - p.loss_after) if live and p is not None and p.loss_after is not None \
            and p.loss_before is not None else float("nan")
        yield GaugeMetricFamily("minerd_exchange_preview_loss_delta", "Held-out loss the last submission removed "
                                "in this miner's preview of the aggregator's scoring (before minus after; positive "
                                "helps)", value=delta)
        yield CounterMetricFamily("minerd_exchange_global_refused", "Global revisions refused (did not verify, "
                                  "or made for another model, tokenizer or dataset)",
                                  value=m.counts["refused_global"] if live else 0)

    def describe(self) -> Iterator[Any]:
        return self._families(live=False)

    def collect(self) -> Iterator[Any]:
        return self._families(live=True)
