"""The machine a run trains on: threads and the device, decided once before any tensor work."""

from __future__ import annotations

import contextlib

import torch

from daemon.config import Config, ConfigError
from daemon.cores import machine_cores
from daemon.distributed import Launch
from daemon.run.catalog import CATALOG, Catalog


def configure_threads(cfg: Config, launch: Launch, catalog: Catalog = CATALOG) -> int:
    """Torch threads so that the trainer and the task's own threads (FAISS) fit the cores.

    The defaults oversubscribe small machines badly: a small trainer measured 45 it/s
    with one thread against 6.6 with two while faiss was loaded on two cores.
    """
    n = cfg.train.torch_threads
    if n == 0:
        per_process = max(1, machine_cores() // max(1, launch.local_world_size))
        n = max(1, per_process - catalog.task_for(cfg).threads(cfg))
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
