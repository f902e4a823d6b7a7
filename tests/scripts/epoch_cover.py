"""Run under torchrun by tests/test_distributed.py: train one epoch with the real
trainer on every rank, record the item ids each rank's micro-batches gathered
(by wrapping the task's own get_batch seam), and check on rank 0 that the ranks
together saw every item of the epoch exactly once."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry

from daemon.config import load_config
from daemon.distributed import Launch, init_process_group
from daemon.gpu import GpuProbe
from daemon.metrics import build_core_metrics
from daemon.state import MinerState
from daemon.training.build import build_trainer


class NeverStop:
    requested = False

    def abandon_partial_step(self) -> bool:
        return False


def main(state_dir: str, sync: str) -> int:
    torch.set_num_threads(1)
    launch = Launch.from_env()
    cfg = load_config(sets=[
        f"paths.state_dir={state_dir}", "data.num_docs=2048", "data.eval_queries=16", "data.dim=16",
        "train.hidden_dim=32", "train.embed_dim=16", "train.batch_size=32", "train.effective_batch_size=128",
        f"train.sync={sync}", "mining.enabled=false", "upload.enabled=false", "embeddings.enabled=false",
    ], environ={}, world_size=launch.world_size)
    device = torch.device("cpu")
    init_process_group(launch, device, 60)
    state = MinerState()
    trainer, task = build_trainer(cfg, state, build_core_metrics(CollectorRegistry(), state, GpuProbe()),
                                  NeverStop(), launch, device)
    seen: list[torch.Tensor] = []
    real_get_batch = task.get_batch

    def recording(idx: torch.Tensor, dev: torch.device):  # type: ignore[no-untyped-def]
        if trainer.c.epoch == 1:
            seen.append(idx.clone())
        return real_get_batch(idx, dev)

    task.get_batch = recording  # type: ignore[method-assign]
    while trainer.c.epoch == 1:
        trainer.inner_step()
    mine = torch.cat(seen).tolist()
    gathered: list[list[int] | None] = [None] * launch.world_size
    dist.all_gather_object(gathered, mine)
    if launch.rank == 0:
        per_rank = [set(g or []) for g in gathered]
        total = sum(len(g or []) for g in gathered)
        union = set().union(*per_rank)
        ok = total == len(union) == 2048 and all(len(s) == 1024 for s in per_rank)
        print(f"EPOCH_COVER total={total} unique={len(union)} per_rank={[len(s) for s in per_rank]} ok={ok}")
    # Leave together: rank 0 did more work above, and a gloo peer tearing down while the
    # other still talks aborted rank 0 once at exit ("terminate called", SIGABRT) in CI.
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
