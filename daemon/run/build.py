"""The one builder: from the config to a finished run.

``build_run`` picks one registered part of each kind by name (the task ``train.task``
names, the data source it asks for, the outer sync the config selects), builds them in
that order, and adds what every run shares: the optimizer, the checkpoint store, the
uploader, the metrics of tokens and evaluations. It hands back a :class:`Run` whose
trainer is complete and whose components are listed in start order; nothing is attached
afterwards. The runner, the tests, the benchmarks and the torchrun test scripts all
build through here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from prometheus_client import CollectorRegistry, Counter

from daemon.checkpoint import CheckpointStore
from daemon.compression import CodecSpec, CompressionStats
from daemon.compression.stats import register as register_compression
from daemon.config import Config
from daemon.diagnostics import accumulation_steps
from daemon.disk import DiskFullReporter
from daemon.distributed import CommCounter, Launch, broadcast_params
from daemon.engine.protocols import OuterStep, Sampler, Stateful, StepHook, StopSignal, Task
from daemon.engine.trainer import Parts, Trainer, amp_dtype
from daemon.gpu import peak_flops
from daemon.metrics import CoreMetrics, EvalCollector
from daemon.plugin.parts import BuildContext, Component, SyncContext
from daemon.run.catalog import CATALOG, Catalog
from daemon.run.sharded_upload import ShardedUploadHook
from daemon.run.upload_hook import UploadHook
from daemon.sharding import describe, prepare_blocks, shard_model
from daemon.state import MinerState
from daemon.telemetry import Throughput
from daemon.upload import Uploader


@dataclass
class Run:
    """A finished run: the trainer, and the components to start in this order (after the API;
    stopped in reverse). The rest names what the builder chose and made, for the runner's
    lines, tests and benchmarks to read; the trainer keeps its own internals."""

    trainer: Trainer
    task: Task
    components: list[Component]
    sampler: Sampler
    device: torch.device
    accumulation: int  # micro-batches per inner step
    stateful: dict[str, Stateful]  # the checkpointed parts beside the model and optimizers
    store: CheckpointStore
    outer_sync: str  # the registered outer sync's name
    data_source: str
    outer: OuterStep  # what the outer sync made (the trainer steps it; tests and benchmarks read it)
    optimizer: torch.optim.Optimizer | None = None  # the inner optimizer (tests and benchmarks read its state)
    sharding: str | None = None  # the "Sharding: fsdp over N ranks: ..." line of a sharded model


def build_run(
    cfg: Config,
    state: MinerState,
    metrics: CoreMetrics,
    registry: CollectorRegistry,
    stop: StopSignal,
    launch: Launch,
    device: torch.device,
    on_disk_full: DiskFullReporter | None = None,
    catalog: Catalog = CATALOG,
) -> Run:
    """``on_disk_full`` reports writes a full disk refused (``daemon/disk.py``); it goes to every
    part that writes: checkpoints, the uploader, the task's own stores. ``catalog``: the
    registered parts to choose from (a test adds its own)."""
    on_full = on_disk_full or DiskFullReporter()
    task_entry = catalog.task_for(cfg)
    sync_entry = catalog.sync_for(cfg, launch.world_size)
    request = task_entry.data(cfg)
    ctx = BuildContext(cfg, state, registry, launch, device, on_full, replica=sync_entry.replica(cfg))
    torch.manual_seed(cfg.train.seed)
    data = catalog.data[request.source].build(ctx, request.spec)
    parts = task_entry.build(ctx, data)
    model = parts.model
    state.model_on_accelerator = next(model.parameters()).device.type == "cuda"
    state.sections.update(parts.sections)
    registry.register(EvalCollector(state, parts.eval_gauges))
    comm = CommCounter()
    codec_stats = CompressionStats()
    broadcast_params(model)  # every rank starts from rank 0's weights
    t = cfg.train
    prepare_blocks(model, parts.blocks, t.activation_checkpointing, t.compile)
    sharded = t.sharding == "fsdp"
    if sharded:
        shard_model(model, parts.blocks, device, amp_dtype(t.amp, device))
    task_loss = getattr(parts.task, "held_out_loss", None)  # tasks that score by a held-out loss

    def held_out_loss(m: torch.nn.Module) -> float:
        assert task_loss is not None
        return float(task_loss(m, device, state.beat))

    sync = sync_entry.build(SyncContext(cfg, state, registry, launch, device, model, comm, codec_stats,
                                        parts.data_record, held_out_loss if task_loss is not None else None))
    state.sections.update(sync.sections)
    # foreach/fused off: the stability rails our users run AdamW with.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, foreach=False, fused=False
    )
    stateful: dict[str, Stateful] = {**parts.stateful, **sync.stateful}
    upload = cfg.upload
    artifact = upload.enabled and upload.artifact != "weights"
    if sync.compresses or artifact:
        register_compression(registry, codec_stats)
        state.sections["compression"] = codec_stats.status
    # Every rank reads the checkpoint it resumes from; only rank 0 writes.
    store = CheckpointStore(cfg.state_dir / "checkpoints", cfg.checkpoint.keep)
    if launch.is_main:
        store.prepare()
    hooks = list(parts.hooks)
    # The sync's last: stopped first, before the task's parts it may still be feeding.
    components = [*parts.components, *sync.components]
    uploader = None
    if upload.enabled and launch.is_main:
        cc = cfg.compression
        codec = CodecSpec.of(upload.compression, cc.block, cc.keep, cc.quantize) if artifact else None
        uploader = Uploader.from_config(upload, cfg.state_dir, registry, config_hash=cfg.digest(),
                                        layout=parts.layout, on_disk_full=on_full, codec=codec, stats=codec_stats)
        uploader.data_record = parts.data_record
        components.append(uploader)
        state.sections["upload"] = uploader.status
    upload_hook: StepHook | None = None
    if upload.enabled and sharded:  # the weights are gathered by every rank, published by rank 0
        upload_hook = ShardedUploadHook(uploader, state, device, pseudo=artifact)
    elif uploader is not None:
        upload_hook = UploadHook(uploader, state)
    if upload_hook is not None:
        hooks.append(upload_hook)
    throughput = Throughput()
    if parts.tokens_per_sample is not None:
        throughput = Throughput(
            tokens_per_sample=parts.tokens_per_sample,
            flops_per_token=parts.flops_per_token,
            peak_flops=peak_flops(device, cfg.telemetry.peak_tflops),
            tokens=Counter("minerd_tokens", "Tokens trained since start (whole job)", registry=registry),
        )
    accumulation = accumulation_steps(cfg, launch.world_size)
    trainer = Trainer(
        Parts(
            cfg=cfg,
            task=parts.task,
            model=sync.model,
            optimizer=optimizer,
            outer=sync.outer,
            sampler=parts.sampler,
            device=device,
            store=store,
            accumulation=accumulation,
            world_size=launch.world_size,
            hooks=hooks,
            stateful=stateful,
            is_main=launch.is_main,
            comm=comm,
            throughput=throughput,
            on_disk_full=on_full,
            join=sync.join,
            sharded=sharded,
        ),
        state,
        metrics,
        stop,
    )
    # This rank's share of the training state, read at request time.
    state.sections["memory"] = trainer.state_bytes
    return Run(trainer, parts.task, components, parts.sampler, device, accumulation, stateful, store,
               sync_entry.name, request.source, sync.outer, optimizer=optimizer,
               sharding=describe(model, launch.world_size) if sharded else None)
