"""Every custom collector declares its names, so a registry refuses a name clash at registration.

``CollectorRegistry()`` learns a collector's names only from its ``describe()``; without one a
clash registers silently and ``/metrics`` serves the name twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from daemon.compression import CompressionStats
from daemon.compression.stats import CompressionCollector
from daemon.config import UploadConfig
from daemon.disk import DiskMetrics, _FreeCollector
from daemon.gpu import GpuProbe, GpuStats
from daemon.metrics import EvalCollector, StateCollector
from daemon.run.local import cpu_run
from daemon.state import MinerState
from daemon.sync.torchft.stats import FtCollector, FtStats
from daemon.tasks.causal_lm.task import EVAL_GAUGES as LM_EVAL_GAUGES
from daemon.tasks.twotower.embeddings import EmbeddingStore
from daemon.tasks.twotower.embeddings.metrics import EmbeddingCacheCollector
from daemon.tasks.twotower.mining.metrics import QueueDepths, _QueueCollector
from daemon.tasks.twotower.task import EVAL_GAUGES as TWOTOWER_EVAL_GAUGES
from daemon.upload import Uploader
from daemon.upload.metrics import UploadStateCollector
from tests.conftest import small_lm_sets, small_sets


class Described(Protocol):
    """A collector with the describe() the registry reads its names from."""

    def describe(self) -> Iterable[Metric]: ...

    def collect(self) -> Iterable[Metric]: ...


class _Claims:
    """A collector that declares one gauge name: the second comer of a clash."""

    def __init__(self, name: str) -> None:
        self.name = name

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.name, "claims a name another collector declared")

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.name, "claims a name another collector declared", value=1.0)


class _OneGpu(GpuProbe):
    """The probe on a machine with one GPU and NVML, so the GPU gauges appear on this CPU-only one."""

    def devices(self) -> list[GpuStats]:
        return [GpuStats("cuda:0", "NVIDIA H100", 1 << 30, 2 << 30, 80 << 30, 0.5)]


# Each builder makes a collector as the daemon does and feeds it until its conditional
# metrics appear; the name is one it yields only then, the one a clash test claims.
def _state(tmp_path: Path) -> Described:
    s = MinerState(task="causal_lm")
    s.loss, s.learning_rate, s.tokens_per_second, s.mfu = 2.5, 3e-4, 1e4, 0.4
    s.last_step_time = s.last_checkpoint_time = 1.7e9
    s.checkpoint_bytes = 1 << 20
    return StateCollector(s, _OneGpu())


def _eval(gauges: dict[str, tuple[str, str]]) -> Callable[[Path], Described]:
    def build(tmp_path: Path) -> Described:
        s = MinerState()
        s.eval = dict.fromkeys(gauges, 0.5)
        return EvalCollector(s, gauges)

    return build


def _disk_free(tmp_path: Path) -> Described:
    return _FreeCollector(tmp_path)


def _upload_state(tmp_path: Path) -> Described:
    cfg = UploadConfig.model_validate({"min_inner_step": 0, "every_inner_steps": 1})
    uploader = Uploader.from_config(cfg, tmp_path, CollectorRegistry())
    return UploadStateCollector(uploader._live_state)


def _compression(tmp_path: Path) -> Described:
    stats = CompressionStats()
    stats.record("upload", 1000, 8000, 0.01, 0.002)
    stats.record("outer_sync", 500, 8000, 0.01, 0.002)
    return CompressionCollector(stats)


def _ft(tmp_path: Path) -> Described:
    stats = FtStats("http://lighthouse:29510", 0)
    stats.committed(participants=2, seconds=0.3)
    return FtCollector(stats)


def _mining_queues(tmp_path: Path) -> Described:
    return _QueueCollector(lambda: QueueDepths(in_q=1, out_q=2, fifo=4))


def _embedding_cache(tmp_path: Path) -> Described:
    store = EmbeddingStore(64, 4, "memory", chunk_size=16)
    store.get_embeddings(np.arange(8))
    return EmbeddingCacheCollector(store)


COLLECTORS = {
    "state": (_state, "minerd_mfu_ratio"),
    "state-gpu": (_state, "minerd_gpu_utilization_ratio"),
    "eval-causal_lm": (_eval(LM_EVAL_GAUGES), "minerd_eval_bits_per_byte"),
    "eval-twotower": (_eval(TWOTOWER_EVAL_GAUGES), "minerd_eval_recall_at_10"),
    "disk-free": (_disk_free, "minerd_disk_free_bytes"),
    "upload-state": (_upload_state, "minerd_upload_age_seconds"),
    "compression": (_compression, "minerd_compression_ratio"),
    "ft": (_ft, "minerd_ft_outer_sync_seconds"),
    "mining-queues": (_mining_queues, "minerd_mining_fifo_depth"),
    "embedding-cache": (_embedding_cache, "minerd_embedding_disk_syncs"),
}


def _families(metrics: Iterable[Metric]) -> set[tuple[str, str]]:
    # The type too: the registry derives a family's names from it (a counter adds _total, _created).
    return {(m.name, m.type) for m in metrics}


@pytest.mark.parametrize(("build", "name"), COLLECTORS.values(), ids=COLLECTORS.keys())
class TestCollectorDeclaresItsNames:
    """Each collector's describe() names every family its collect() can yield, conditional ones included."""

    def test_a_clash_is_refused_at_registration(self, tmp_path: Path, build: Callable[[Path], Described],
                                                name: str) -> None:
        registry = CollectorRegistry()
        registry.register(build(tmp_path))
        with pytest.raises(ValueError, match=rf"Duplicated timeseries.*{name}"):
            registry.register(_Claims(name))

    def test_collect_yields_only_declared_families(self, tmp_path: Path, build: Callable[[Path], Described],
                                                   name: str) -> None:
        collector = build(tmp_path)
        collected = _families(collector.collect())
        assert name in {n for n, _ in collected}  # fed: the conditional one is there to check
        assert collected <= _families(collector.describe())


# Families only the collectors above yield, one of each, to show the run built them all.
RUN_FAMILIES = {
    "twotower": {"minerd_info", "minerd_eval_recall_at_1", "minerd_disk_free_bytes", "minerd_mining_queue_depth",
                 "minerd_embedding_cache_requests"},
    "causal_lm": {"minerd_info", "minerd_eval_loss", "minerd_disk_free_bytes", "minerd_upload_stale",
                  "minerd_compression_ratio"},
}


@pytest.fixture(scope="module", params=sorted(RUN_FAMILIES))
def run_registry(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[str, CollectorRegistry]:
    """A run's registry as ``minerd run`` fills it: the core's, the disk's, then the built run's."""
    task = request.param
    state_dir = tmp_path_factory.mktemp(task)
    registry = CollectorRegistry()
    DiskMetrics(registry, state_dir)
    if task == "twotower":
        sets = small_sets(state_dir, "mining.enabled=true", "embeddings.enabled=true")
    else:
        sets = small_lm_sets(state_dir, "upload.enabled=true", "upload.artifact=both")
    # Every register() along the build raises ValueError on a clash of declared names.
    _, registry, state = cpu_run(sets, registry=registry)
    # Values for the gauges absent until known, so the scrape has them too.
    state.loss, state.learning_rate, state.last_step_time = 2.0, 1e-3, 1.7e9
    state.eval = {key: 0.5 for key in (LM_EVAL_GAUGES if task == "causal_lm" else TWOTOWER_EVAL_GAUGES)}
    return task, registry


class TestRunRegistry:
    """A whole run's registry holds each name once, and refuses a collector that would repeat one."""

    def test_each_family_once(self, run_registry: tuple[str, CollectorRegistry]) -> None:
        task, registry = run_registry
        names = [m.name for m in registry.collect()]
        assert sorted(n for n in set(names) if names.count(n) > 1) == []
        assert RUN_FAMILIES[task] <= set(names)
        assert b"minerd_loss 2.0" in generate_latest(registry)

    def test_a_clash_is_refused(self, run_registry: tuple[str, CollectorRegistry]) -> None:
        _, registry = run_registry
        with pytest.raises(ValueError, match=r"Duplicated timeseries.*minerd_loss"):
            registry.register(_Claims("minerd_loss"))
