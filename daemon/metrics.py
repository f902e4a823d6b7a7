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


class StateCollector(Collector):
    """Progress and device gauges, read from the live state at scrape time."""

    def __init__(self, state: MinerState, gpu: GpuProbe) -> None:
        self._state = state
        self._gpu = gpu

    def collect(self) -> Iterator[Metric]:
        s = self._state
        info = GaugeMetricFamily(
            "minerd_info", "Build and run facts", labels=["version", "task", "device", "rank"]
        )
        info.add_metric([s.version, s.task, s.device, str(s.rank)], 1.0)
        yield info
        for name, doc, value in (
            ("minerd_outer_step", "Outer step as the miner reports it", s.outer_step),
            ("minerd_inner_step", "Inner step within the current outer step", s.inner_step),
            ("minerd_global_step", "Inner steps over the whole training", s.global_step),
            ("minerd_epoch", "Current epoch", s.epoch),
            ("minerd_model_on_accelerator", "1 when the model's parameters are on a GPU",
             1 if s.model_on_accelerator else 0),
        ):
            yield GaugeMetricFamily(name, doc, value=float(value))
        for name, doc, maybe in (
            ("minerd_loss", "Loss of the last inner step", s.loss),
            ("minerd_learning_rate", "Learning rate of the last inner step", s.learning_rate),
            ("minerd_tokens_per_second", "Tokens trained per second in the last inner step (whole job)",
             s.tokens_per_second),
            ("minerd_mfu_ratio", "Model FLOPs utilisation of this device in the last inner step", s.mfu),
            ("minerd_last_step_timestamp_seconds", "Wall clock of the last inner step (heartbeat)",
             s.last_step_time),
            ("minerd_last_checkpoint_timestamp_seconds", "Wall clock of the last checkpoint written",
             s.last_checkpoint_time),
            ("minerd_checkpoint_size_bytes", "Room one checkpoint may take: the largest one kept", s.checkpoint_bytes),
        ):
            # Absent until known: a made-up 0 would look like a real value.
            if maybe is not None:
                yield GaugeMetricFamily(name, doc, value=float(maybe))
        yield CounterMetricFamily("minerd_api_requests_shed", "Requests answered 429 for being over the API's "
                                  "request budget", value=float(s.requests_shed))
        yield from self._gpu_families()

    def _gpu_families(self) -> Iterator[Metric]:
        devices = self._gpu.devices()
        if not devices:
            return
        fams = {
            "allocated": GaugeMetricFamily(
                "minerd_gpu_memory_allocated_bytes", "Memory held by tensors", labels=["device"]
            ),
            "reserved": GaugeMetricFamily(
                "minerd_gpu_memory_reserved_bytes", "Memory held by the caching allocator", labels=["device"]
            ),
            "total": GaugeMetricFamily("minerd_gpu_memory_total_bytes", "Device memory", labels=["device"]),
        }
        util = GaugeMetricFamily(
            "minerd_gpu_utilization_ratio", "GPU utilisation from NVML", labels=["device"]
        )
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

    def collect(self) -> Iterator[Metric]:
        values = self._state.eval
        for key, (name, doc) in self._gauges.items():
            if key in values:
                yield GaugeMetricFamily(name, doc, value=float(values[key]))


def build_core_metrics(registry: CollectorRegistry, state: MinerState, gpu: GpuProbe) -> CoreMetrics:
    registry.register(StateCollector(state, gpu))
    return CoreMetrics(registry)
