"""Factories: from the config to a ready-to-run trainer.

Thread counts and the device are decided here, once, before any tensor work.
"""

from __future__ import annotations

import contextlib
import os

import structlog
import torch

from daemon.checkpoint import CheckpointStore
from daemon.config import Config, ConfigError
from daemon.diagnostics import accumulation_steps
from daemon.distributed import CommCounter, Launch, averaging_reduce, broadcast_params, wrap_ddp
from daemon.metrics import CoreMetrics
from daemon.state import MinerState
from daemon.training.engine import Parts, StopSignal, Trainer
from daemon.training.outer import OuterOptimizer
from daemon.training.sampler import EpochSampler
from daemon.training.twotower import TwoTowerTask, load_or_generate

log = structlog.get_logger(__name__)


def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_threads(cfg: Config, launch: Launch) -> int:
    """Torch threads so that trainer + FAISS miner threads fit the cores.

    The defaults oversubscribe small machines badly (NOTES-mining: 45 it/s
    with one thread against 6.6 with two while faiss was loaded).
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


def build_trainer(
    cfg: Config,
    state: MinerState,
    metrics: CoreMetrics,
    stop: StopSignal,
    launch: Launch,
    device: torch.device,
) -> tuple[Trainer, TwoTowerTask]:
    corpus = load_or_generate(cfg, cfg.state_dir / "data")
    task = TwoTowerTask(cfg, corpus)
    torch.manual_seed(cfg.train.seed)
    model = task.build_model().to(device)
    state.model_on_accelerator = next(model.parameters()).device.type == "cuda"
    comm = CommCounter()
    broadcast_params(model)  # every rank starts from rank 0's weights
    # foreach/fused off: the seed's stability rails for AdamW.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, foreach=False, fused=False
    )
    # DiLoCo averages pseudo-gradients at each outer step; under DDP gradients are
    # averaged every inner step already, so parameters agree and the reduction is the identity.
    diloco = launch.world_size > 1 and cfg.train.sync == "diloco"
    reduce = averaging_reduce(comm) if diloco else (lambda grads: None)
    outer = OuterOptimizer(list(model.parameters()), cfg.train.outer_lr, cfg.train.outer_momentum, reduce)
    wrapped = wrap_ddp(model, device, comm) if launch.world_size > 1 and cfg.train.sync == "ddp" else model
    sampler = EpochSampler(
        task.num_items, cfg.train.batch_size, cfg.train.seed, launch.rank, launch.world_size, cfg.train.drop_last
    )
    # Every rank reads the checkpoint it resumes from; only rank 0 writes.
    store = CheckpointStore(cfg.state_dir / "checkpoints", cfg.checkpoint.keep)
    if launch.is_main:
        store.prepare()
    parts = Parts(
        cfg=cfg,
        task=task,
        model=wrapped,
        optimizer=optimizer,
        outer=outer,
        sampler=sampler,
        device=device,
        store=store,
        accumulation=accumulation_steps(cfg, launch.world_size),
        world_size=launch.world_size,
        is_main=launch.is_main,
        comm=comm,
    )
    return Trainer(parts, state, metrics, stop), task
