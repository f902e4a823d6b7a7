"""Run under torchrun by tests/test_distributed.py: train one epoch with the real
trainer on every rank, record the item ids each rank's micro-batches gathered
(by wrapping the task's own get_batch seam), and check on rank 0 that the ranks
together saw every item of the epoch exactly once. Either task: two-tower items are
documents, language-model items are packed token sequences."""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry

from daemon.distributed import Launch, init_process_group
from daemon.gpu import GpuProbe
from daemon.metrics import build_core_metrics
from daemon.run.build import build_run
from daemon.run.catalog import load_config
from daemon.run.local import NeverStop
from daemon.state import MinerState
from tests.conftest import task_sets

TWOTOWER = ["twotower.corpus=synthetic", "twotower.num_docs=2048", "twotower.eval_queries=16", "twotower.dim=16",
            "twotower.hidden_dim=32", "twotower.embed_dim=16", "train.batch_size=32", "train.effective_batch_size=128"]
# An epoch of the language model covers the whole training split: a small corpus (100 KB) keeps it short.
STDLIB = Path(sysconfig.get_paths()["stdlib"])
LM = [f"lm.corpus=[{STDLIB / 'json'}, {STDLIB / 'collections'}]", "train.batch_size=8",
      "train.effective_batch_size=32", "lm.eval_every_steps=100000"]


def main(state_dir: str, sync: str, task: str) -> int:
    torch.set_num_threads(1)
    launch = Launch.from_env()
    extra = LM if task == "causal_lm" else TWOTOWER
    sets = task_sets(task, Path(state_dir), *extra, f"train.sync={sync}", "mining.enabled=false",
                     "upload.enabled=false", "embeddings.enabled=false")
    cfg = load_config(sets=sets, environ={}, world_size=launch.world_size)
    device = torch.device("cpu")
    init_process_group(launch, device, 120)
    state = MinerState()
    registry = CollectorRegistry()
    run = build_run(cfg, state, build_core_metrics(registry, state, GpuProbe()), registry, NeverStop(), launch,
                    device)
    trainer, task_obj = run.trainer, run.task
    seen: list[torch.Tensor] = []
    real_get_batch = task_obj.get_batch

    def recording(idx: torch.Tensor, dev: torch.device, pos):  # type: ignore[no-untyped-def]
        if trainer.progress.epoch == 1:
            seen.append(idx.clone())
        return real_get_batch(idx, dev, pos)

    task_obj.get_batch = recording  # type: ignore[method-assign]
    while trainer.progress.epoch == 1:
        trainer.inner_step()
    mine = torch.cat(seen).tolist()
    gathered: list[list[int] | None] = [None] * launch.world_size
    dist.all_gather_object(gathered, mine)
    if launch.rank == 0:
        per_rank = [set(g or []) for g in gathered]
        total = sum(len(g or []) for g in gathered)
        union = set().union(*per_rank)
        expected = run.sampler.batches_per_epoch * cfg.train.batch_size * launch.world_size
        ok = total == len(union) == expected and len({len(s) for s in per_rank}) == 1
        print(f"EPOCH_COVER total={total} unique={len(union)} expected={expected} "
              f"items={task_obj.num_items} per_rank={[len(s) for s in per_rank]} ok={ok}")
    # Leave together: rank 0 did more work above, and a gloo peer tearing down while the
    # other still talks aborted rank 0 once at exit ("terminate called", SIGABRT) in CI.
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "twotower")
    # The verdict is printed and the group is gone: leave without the interpreter's teardown, in
    # which gloo's threads still being destroyed aborted a rank now and then ("terminate called
    # without an active exception", SIGABRT) after a correct run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
