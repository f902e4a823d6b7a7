"""The one builder: from the config to a finished run.

``build_run`` asks the configured task (``daemon/tasks``) for its parts, then adds what
every task shares: the optimizer, the outer step, DDP, the checkpoint store, the
uploader, the metrics of tokens and evaluations. It hands back a :class:`Run` whose
trainer is complete and whose components are listed in start order; nothing is
attached afterwards. The runner, the tests, the benchmarks and the torchrun test
scripts all build through here.

Thread counts and the device are decided here, once, before any tensor work.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import cast

import structlog
import torch
from prometheus_client import CollectorRegistry, Counter

from daemon.checkpoint import CheckpointStore
from daemon.compression import CodecSpec, CompressionStats
from daemon.compression.stats import register as register_compression
from daemon.compression.sync import CompressedAverage
from daemon.config import Config, ConfigError
from daemon.diagnostics import accumulation_steps
from daemon.disk import DiskFullReporter
from daemon.distributed import CommCounter, Launch, averaging_reduce, broadcast_params, wrap_ddp
from daemon.gpu import peak_flops
from daemon.lifecycle import Component
from daemon.metrics import CoreMetrics, EvalCollector
from daemon.state import MinerState
from daemon.tasks import TASKS
from daemon.telemetry import Throughput
from daemon.training.engine import Parts, StopSignal, Trainer
from daemon.training.hooks import UploadHook
from daemon.training.outer import OuterOptimizer, Reduce, identity_reduce
from daemon.training.task import BuildContext, Task
from daemon.upload import Uploader

log = structlog.get_logger(__name__)


def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_threads(cfg: Config, launch: Launch) -> int:
    """Torch threads so that trainer + FAISS miner threads fit the cores.

    The defaults oversubscribe small machines badly: a small trainer measured 45 it/s
    with one thread against 6.6 with two while faiss was loaded on two cores.
    """
    n = cfg.train.torch_threads
    if n == 0:
        per_process = max(1, machine_cores() // max(1, launch.local_world_size))
        miner = cfg.mining.faiss_threads if cfg.mining.enabled else 0
        n = max(1, per_process - miner)
    torch.set_num_threads(n)
    # Raises once parallel work has run in this process (tests): then it is already fixed.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return n


def resolve_device(cfg: Config, launch: Launch) -> torch.device:
    want = cfg.train.device
    cuda = torch.cuda.is_available()
    if want == "cpu" or (want == "auto" and not cuda):
        return torch.device("cpu")
    if not cuda:
        raise ConfigError([f"config error: train.device: CUDA is not available on this machine (got '{want}')"])
    if want.startswith("cuda:"):
        dev = torch.device(want)
    else:
        dev = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    return dev


@dataclass
class Run:
    """A finished run: the trainer, its task, and the components to start in this order
    (after the API; stopped in reverse)."""

    trainer: Trainer
    task: Task
    components: list[Component]


def fault_tolerant_outer(cfg: Config, params: list[torch.Tensor], state: MinerState,
                         registry: CollectorRegistry, group_reduce: Reduce) -> OuterOptimizer:
    """The outer step across replica groups; ``group_reduce`` averages over the group's own
    ranks first (torchrun) and is the identity for a group of one process."""
    # torchft's compiled part logs every quorum and commit at info to stderr, outside structlog;
    # read once, when it is first imported. minerd's own outer-step line carries the same facts.
    os.environ.setdefault("RUST_LOG", "warn")
    try:
        import torchft  # noqa: F401  (an optional dependency: the `ft` extra)
    except ImportError:
        raise ConfigError(["config error: ft.enabled: torchft is not installed (pip install 'minerd[ft]', "
                           "or make setup)"]) from None
    from daemon.ft.outer import FtOuterOptimizer
    from daemon.ft.stats import FtStats
    from daemon.ft.stats import register as register_ft

    stats = FtStats(cfg.ft.lighthouse, cfg.ft.replica_group)
    register_ft(registry, stats)
    state.sections["ft"] = stats.status
    return FtOuterOptimizer(params, cfg, state, stats, group_reduce)


def codec_spec(cfg: Config, name: str) -> CodecSpec:
    cc = cfg.compression
    return CodecSpec.of(name, cc.block, cc.keep, cc.quantize)


def build_run(
    cfg: Config,
    state: MinerState,
    metrics: CoreMetrics,
    registry: CollectorRegistry,
    stop: StopSignal,
    launch: Launch,
    device: torch.device,
    on_disk_full: DiskFullReporter | None = None,
) -> Run:
    """``on_disk_full`` reports writes a full disk refused (``daemon/disk.py``); it goes to every
    part that writes: checkpoints, the uploader, the task's own stores."""
    on_full = on_disk_full or DiskFullReporter()
    entry = TASKS[cfg.train.task]
    torch.manual_seed(cfg.train.seed)
    parts = entry.build(BuildContext(cfg, state, registry, launch, device, on_full))
    model = parts.model
    state.model_on_accelerator = next(model.parameters()).device.type == "cuda"
    state.sections.update(parts.sections)
    registry.register(EvalCollector(state, parts.eval_gauges))
    comm = CommCounter()
    broadcast_params(model)  # every rank starts from rank 0's weights
    # foreach/fused off: the stability rails our users run AdamW with.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, foreach=False, fused=False
    )
    # DiLoCo averages pseudo-gradients at each outer step; under DDP gradients are
    # averaged every inner step already, so parameters agree and the reduction is the identity.
    diloco = launch.world_size > 1 and cfg.train.sync == "diloco"
    stateful = dict(parts.stateful)
    stats = CompressionStats()
    outer_codec = cfg.train.outer_compression if diloco else "none"
    if outer_codec != "none" or (cfg.upload.enabled and cfg.upload.artifact != "weights"):
        register_compression(registry, stats)
        state.sections["compression"] = stats.status
    reduce: Reduce = averaging_reduce(comm) if diloco else identity_reduce
    if outer_codec != "none":
        names = [name for name, _ in model.named_parameters()]
        compressed = CompressedAverage(names, codec_spec(cfg, outer_codec), comm, stats, launch.rank, device)
        stateful["outer_compression"] = compressed
        reduce = compressed
    outer = (fault_tolerant_outer(cfg, list(model.parameters()), state, registry, reduce) if cfg.ft.enabled
             else OuterOptimizer(list(model.parameters()), cfg.train.outer_lr, cfg.train.outer_momentum, reduce))
    wrapped = wrap_ddp(model, device, comm) if launch.world_size > 1 and cfg.train.sync == "ddp" else model
    # Every rank reads the checkpoint it resumes from; only rank 0 writes.
    store = CheckpointStore(cfg.state_dir / "checkpoints", cfg.checkpoint.keep)
    if launch.is_main:
        store.prepare()
    hooks = list(parts.hooks)
    components = list(parts.components)
    if cfg.ft.enabled:
        components.append(cast(Component, outer))  # stopped last-in first-out: its manager is released
    if cfg.upload.enabled and launch.is_main:
        codec = codec_spec(cfg, cfg.upload.compression) if cfg.upload.artifact != "weights" else None
        uploader = Uploader.from_config(cfg.upload, cfg.state_dir, registry, config_hash=cfg.digest(),
                                        layout=parts.layout, on_disk_full=on_full, codec=codec, stats=stats)
        components.append(uploader)
        state.sections["upload"] = uploader.status
        hooks.append(UploadHook(uploader, state))
    throughput = Throughput()
    if parts.tokens_per_sample is not None:
        throughput = Throughput(
            tokens_per_sample=parts.tokens_per_sample,
            flops_per_token=parts.flops_per_token,
            peak_flops=peak_flops(device, cfg.telemetry.peak_tflops),
            tokens=Counter("minerd_tokens", "Tokens trained since start (whole job)", registry=registry),
        )
    trainer = Trainer(
        Parts(
            cfg=cfg,
            task=parts.task,
            model=wrapped,
            optimizer=optimizer,
            outer=outer,
            sampler=parts.sampler,
            device=device,
            store=store,
            accumulation=accumulation_steps(cfg, launch.world_size),
            world_size=launch.world_size,
            hooks=hooks,
            stateful=stateful,
            is_main=launch.is_main,
            comm=comm,
            throughput=throughput,
            on_disk_full=on_full,
        ),
        state,
        metrics,
        stop,
    )
    return Run(trainer, parts.task, components)
