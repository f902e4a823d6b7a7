"""Factories: from the config to a ready-to-run trainer.

Thread counts and the device are decided here, once, before any tensor work.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import structlog
import torch

from daemon.checkpoint import CheckpointStore
from daemon.config import Config, ConfigError
from daemon.diagnostics import accumulation_steps
from daemon.metrics import CoreMetrics
from daemon.state import MinerState
from daemon.training.engine import Parts, StopSignal, Trainer
from daemon.training.outer import OuterOptimizer
from daemon.training.sampler import EpochSampler
from daemon.training.twotower import TwoTowerTask, load_or_generate

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the job (torchrun's environment, or alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Launch:
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        return cls(
            rank=int(env.get("RANK", "0")),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", "0")),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
        )


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
    # foreach/fused off: the seed's stability rails for AdamW.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, foreach=False, fused=False
    )
    outer = OuterOptimizer(list(model.parameters()), cfg.train.outer_lr, cfg.train.outer_momentum)
    sampler = EpochSampler(
        task.num_items, cfg.train.batch_size, cfg.train.seed, launch.rank, launch.world_size, cfg.train.drop_last
    )
    store = CheckpointStore(cfg.state_dir / "checkpoints", cfg.checkpoint.keep) if launch.is_main else None
    if store is not None:
        store.prepare()
    parts = Parts(
        cfg=cfg,
        task=task,
        model=model,
        optimizer=optimizer,
        outer=outer,
        sampler=sampler,
        device=device,
        store=store,
        accumulation=accumulation_steps(cfg, launch.world_size),
        world_size=launch.world_size,
    )
    return Trainer(parts, state, metrics, stop), task
