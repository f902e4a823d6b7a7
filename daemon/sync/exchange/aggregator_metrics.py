"""The aggregator's metrics, read at scrape time from its last round."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from daemon.sync.exchange.aggregator import Aggregator

REASONS = ("accepted", "no_improvement", "structure", "not_finite", "stale_round", "foreign", "copy")


class AggregatorCollector(Collector):
    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg

    def _families(self, live: bool) -> Iterator[Any]:
        a = self.agg
        yield GaugeMetricFamily("minerd_aggregator_round", "The open round", value=a.round if live else 0)
        loss = a.held_out_loss if live and a.held_out_loss is not None else float("nan")
        yield GaugeMetricFamily("minerd_aggregator_held_out_loss", "Held-out loss of the last published global "
                                "revision", value=loss)
        yield GaugeMetricFamily("minerd_aggregator_round_seconds", "Seconds the last closed round was open",
                                value=a.last_round_seconds if live else 0)
        subs = CounterMetricFamily("minerd_aggregator_submissions", "Submissions scored, by verdict",
                                   labels=["reason"])
        for reason in REASONS:
            subs.add_metric([reason], a.verdicts.get(reason, 0) if live else 0)
        yield subs

    def describe(self) -> Iterator[Any]:
        return self._families(live=False)

    def collect(self) -> Iterator[Any]:
        return self._families(live=True)
