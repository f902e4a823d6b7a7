"""torch.distributed for several processes: set-up, sync strategies, teardown.

The rendezvous is torchrun's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
in the environment); a process started without torchrun is a world of one
and never touches torch.distributed. NCCL on GPUs, gloo on CPU.

Who owns what across ranks:
- rank 0 writes checkpoints and publishes uploads; every rank reads the same
  checkpoint at start, so all resume at the same step;
- each rank mines its own batches with its own FAISS miner and memory bank
  (mining is local work on local batches; sharing it would cost more
  communication than it saves);
- every rank serves its own API on ``api.port + local_rank``.

Collectives have a timeout (``train.dist_timeout_seconds``) so a dead rank
ends the job instead of hanging it; torchrun or the supervisor restarts the
group, which resumes from the last checkpoint.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import torch
import torch.distributed as dist
from torch import nn

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the job (torchrun's environment, or alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    rendezvous: bool = False  # started by torchrun (or another env:// launcher), even as a world of one

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
            rendezvous="MASTER_ADDR" in env and "RANK" in env,
        )


class CommCounter:
    """Bytes this rank sent into collectives for training (gradients, pseudo-gradients)."""

    def __init__(self) -> None:
        self.bytes = 0

    def add(self, tensors: list[torch.Tensor]) -> None:
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)


def init_process_group(launch: Launch, device: torch.device, timeout_seconds: float, alone_too: bool = False) -> None:
    """``alone_too``: a process group even for a world of one (a sharded model needs one)."""
    if (launch.world_size <= 1 and not alone_too) or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_seconds)}
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    log.info("process group ready", backend=backend, rank=launch.rank, world_size=launch.world_size,
             timeout_seconds=timeout_seconds)


def destroy_process_group(together: bool = False) -> None:
    """Tear the group down; with ``together``, after a barrier.

    After a clean stop rank 0 still writes the final checkpoint while the others are
    done: a gloo peer tearing down while another still talks can abort the process at
    exit ("terminate called without an active exception"), a non-zero exit for a
    clean stop. Not after an error: a dead peer would hold the barrier until the
    collective timeout.
    """
    if dist.is_available() and dist.is_initialized():
        if together:
            try:
                dist.barrier()
            except Exception:
                log.warning("ranks did not meet before teardown", exc_info=True)
        dist.destroy_process_group()


def copy_flat_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy the concatenation ``flat`` back into ``tensors``, in order (the inverse of
    ``torch.cat([t.reshape(-1) for t in tensors])``)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def averaging_reduce(counter: CommCounter) -> Callable[[list[torch.Tensor]], dict[str, float] | None]:
    """DiLoCo's outer reduction: average the pseudo-gradients over all ranks."""

    def reduce(grads: list[torch.Tensor]) -> dict[str, float] | None:
        if not dist.is_initialized():
            return None
        world = dist.get_world_size()
        t0 = time.perf_counter()
        flat = torch.cat([g.reshape(-1) for g in grads])
        counter.add([flat])
        dist.all_reduce(flat)
        flat.div_(world)
        copy_flat_into(flat, grads)
        return {"sync_bytes": flat.numel() * flat.element_size(), "sync_seconds": round(time.perf_counter() - t0, 4)}

    return reduce


def wrap_ddp(model: nn.Module, device: torch.device, counter: CommCounter) -> nn.Module:
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    # No annotations: DDP inspects the hook's signature and rejects the string
    # annotations that `from __future__ import annotations` would make of them.
    def counting_allreduce(state, bucket):
        buf = bucket.buffer()
        counter.add([buf])
        world = dist.get_world_size()
        fut = dist.all_reduce(buf, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0].div_(world))

    ddp.register_comm_hook(None, counting_allreduce)
    return ddp


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any: ranks agree when to stop, so
    none waits in a collective for a peer that already left."""
    return any_ranks([flag], device)[0]


def any_ranks(flags: list[bool], device: torch.device) -> list[bool]:
    """``any_rank`` of several flags in one collective."""
    if not dist.is_initialized():
        return list(flags)
    t = torch.tensor([1 if f else 0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def broadcast_params(model: nn.Module) -> None:
    """Start every rank from rank 0's parameters (DiLoCo has no DDP to do it)."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p.data, src=0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
