"""The core's Prometheus metrics, on a registry the miner builds and injects.

Events (a step done, a checkpoint written) update counters and histograms
where they happen. Live state (progress gauges, GPU memory) is read from
``MinerState`` and the GPU probe by a collector at scrape time, so nothing
pushes gauges from many places and a scrape always sees current values.
Components built later (mining, embeddings, upload) register their own
metrics and collectors on the same registry.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.gpu import GpuProbe
from daemon.state import MinerState

# Inner steps run from milliseconds (a small model on a GPU) to minutes (a
# large one with heavy accumulation, or one stuck on the CPU).
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20, 30, 45, 60, 120, 300, 600)


class CoreMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.inner_steps = Counter(
            "minerd_inner_steps", "Inner (optimizer) steps completed since start", registry=registry
        )
        self.samples = Counter("minerd_samples", "Training samples processed since start", registry=registry)
        self.step_duration = Histogram(
            "minerd_step_duration_seconds",
            "Wall time of one inner step",
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.data_wait = Counter(
            "minerd_data_wait_seconds", "Time the training loop spent waiting for data", registry=registry
        )
        self.nonfinite_steps = Counter(
            "minerd_nonfinite_steps", "Inner steps skipped for a non-finite loss", registry=registry
        )
        self.slow_steps = Counter(
            "minerd_slow_steps", "Inner steps slower than telemetry.slow_step_seconds", registry=registry
        )
        self.checkpoints = Counter("minerd_checkpoints", "Local checkpoints written", registry=registry)


# (name, help, MinerState attribute) of the gauges read from the state: always there ...
_PROGRESS = (
    ("minerd_outer_step", "Outer step as the miner reports it", "outer_step"),
    ("minerd_inner_step", "Inner step within the current outer step", "inner_step"),
    ("minerd_global_step", "Inner steps over the whole training", "global_step"),
    ("minerd_epoch", "Current epoch", "epoch"),
    ("minerd_model_on_accelerator", "1 when the model's parameters are on a GPU", "model_on_accelerator"),
)
# ... and absent until known: a made-up 0 would look like a real value.
_LAST_VALUES = (
    ("minerd_loss", "Loss of the last inner step", "loss"),
    ("minerd_learning_rate", "Learning rate of the last inner step", "learning_rate"),
    ("minerd_tokens_per_second", "Tokens trained per second in the last inner step (whole job)",
     "tokens_per_second"),
    ("minerd_mfu_ratio", "Model FLOPs utilisation of this device in the last inner step", "mfu"),
    ("minerd_last_step_timestamp_seconds", "Wall clock of the last inner step (heartbeat)", "last_step_time"),
    ("minerd_last_checkpoint_timestamp_seconds", "Wall clock of the last checkpoint written",
     "last_checkpoint_time"),
    ("minerd_checkpoint_size_bytes", "Room one checkpoint may take: the largest one kept", "checkpoint_bytes"),
)


def _info() -> GaugeMetricFamily:
    return GaugeMetricFamily("minerd_info", "Build and run facts", labels=["version", "task", "device", "rank"])


def _shed() -> CounterMetricFamily:
    return CounterMetricFamily("minerd_api_requests_shed", "Requests answered 429 for being over the API's "
                               "request budget")


def _gpu() -> dict[str, GaugeMetricFamily]:
    return {
        "allocated": GaugeMetricFamily(
            "minerd_gpu_memory_allocated_bytes", "Memory held by tensors", labels=["device"]
        ),
        "reserved": GaugeMetricFamily(
            "minerd_gpu_memory_reserved_bytes", "Memory held by the caching allocator", labels=["device"]
        ),
        "total": GaugeMetricFamily("minerd_gpu_memory_total_bytes", "Device memory", labels=["device"]),
        "util": GaugeMetricFamily("minerd_gpu_utilization_ratio", "GPU utilisation from NVML", labels=["device"]),
    }


class StateCollector(Collector):
    """Progress and device gauges, read from the live state at scrape time."""

    def __init__(self, state: MinerState, gpu: GpuProbe) -> None:
        self._state = state
        self._gpu = gpu

    def describe(self) -> Iterator[Metric]:
        # Every name collect() may yield, the absent-until-known ones and the GPU's too, so
        # the registry refuses a clash at registration rather than serving two series.
        yield _info()
        for name, doc, _ in (*_PROGRESS, *_LAST_VALUES):
            yield GaugeMetricFamily(name, doc)
        yield _shed()
        yield from _gpu().values()

    def collect(self) -> Iterator[Metric]:
        s = self._state
        info = _info()
        info.add_metric([s.version, s.task, s.device, str(s.rank)], 1.0)
        yield info
        for name, doc, attr in _PROGRESS:
            yield GaugeMetricFamily(name, doc, value=float(getattr(s, attr)))
        for name, doc, attr in _LAST_VALUES:
            maybe = getattr(s, attr)
            if maybe is not None:
                yield GaugeMetricFamily(name, doc, value=float(maybe))
        shed = _shed()
        shed.add_metric([], float(s.requests_shed))
        yield shed
        yield from self._gpu_families()

    def _gpu_families(self) -> Iterator[Metric]:
        devices = self._gpu.devices()
        if not devices:
            return
        fams = _gpu()
        util = fams.pop("util")
        for d in devices:
            fams["allocated"].add_metric([d.device], d.allocated_bytes)
            fams["reserved"].add_metric([d.device], d.reserved_bytes)
            fams["total"].add_metric([d.device], d.total_bytes)
            if d.utilization_ratio is not None:
                util.add_metric([d.device], d.utilization_ratio)
        yield from fams.values()
        if util.samples:
            yield util


class EvalCollector(Collector):
    """The task's last evaluation, one gauge per metric it reports (absent until the first)."""

    def __init__(self, state: MinerState, gauges: dict[str, tuple[str, str]]) -> None:
        self._state = state
        self._gauges = gauges

    def describe(self) -> Iterator[Metric]:
        # All the task's gauges, though collect() yields none before the first evaluation.
        for name, doc in self._gauges.values():
            yield GaugeMetricFamily(name, doc)

    def collect(self) -> Iterator[Metric]:
        values = self._state.eval
        for key, (name, doc) in self._gauges.items():
            if key in values:
                yield GaugeMetricFamily(name, doc, value=float(values[key]))


def build_core_metrics(registry: CollectorRegistry, state: MinerState, gpu: GpuProbe) -> CoreMetrics:
    registry.register(StateCollector(state, gpu))
    return CoreMetrics(registry)
