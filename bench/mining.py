"""mining: what asynchronous hard-negative mining costs the trainer, and what it buys.

Throughput (one trainer, mining epochs, blocks of inner steps in rotation so drift
hits every variant alike; steps that end an epoch, with its evaluation, are left out):
  async   the real MiningHook: FAISS searches upcoming batches in its own thread;
  free    the same loop fed a precomputed negatives tensor at no cost (no bank, no FAISS);
  sync    the loop waits for the FAISS search of each micro-batch's own queries.
async_over_free = free time / async time (goal >= 0.95); async_over_sync = sync / async.

Quality (two runs from the same seed, the same steps, micro-batches of ``QUALITY_BATCH``):
in-batch negatives only against mining from ``START_EPOCH`` on; recall@10 on the held-out
queries after the last epoch, gain in points (goal >= +3); the separation margin of the
mining run at epoch 10 (goal >= 0.05; in --quick, at its last epoch).

freshness = share of the async blocks' steps whose negatives were fresh or reused
within ttl (goal >= 0.9), at the default model size, where one FAISS thread keeps up;
freshness_quality_run = the same over the mining quality run.
free_busy_over_free = the free loop while another thread searches the miner's index
non-stop on the other core (several times the miner's own load), over the free loop
alone: what a busy FAISS core costs the trainer without any hook work.

Torch and FAISS use one thread each (2-core machines); the index is IVF, the one that
keeps up with this trainer on such a machine (flat falls behind there).
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import structlog
import torch
from prometheus_client import CollectorRegistry

from bench._common import result
from daemon.engine.trainer import Trainer
from daemon.run.local import cpu_run
from daemon.state import MinerState
from daemon.tasks.twotower.config import TwoTowerConfig
from daemon.tasks.twotower.mining import HardNegativeMiner
from daemon.tasks.twotower.mining.index import load_faiss
from daemon.tasks.twotower.mining_hook import MiningHook
from daemon.tasks.twotower.task import TwoTowerBatch, TwoTowerTask

NUM_DOCS = 20_000  # 78 micro-batches of 256 an epoch
BATCH = 256
START_EPOCH = 2
SETS = [
    "train.task=twotower", "twotower.corpus=synthetic",
    f"twotower.num_docs={NUM_DOCS}",
    "twotower.eval_queries=2000",
    "twotower.cluster_size=32",
    "twotower.embed_dim=128",
    "train.batch_size=256",
    "train.effective_batch_size=256",
    "train.torch_threads=1",
    "mining.faiss_threads=1",
    "mining.index=ivf",
    "mining.qbatch=1024",
    f"mining.refresh_steps={NUM_DOCS // 256}",  # one epoch, in micro-batches
    "upload.enabled=false",
    "api.enabled=false",
    "checkpoint.every_inner_steps=1000000",
    "telemetry.queue_health_every=1000000",
]
# The quality runs train micro-batches of 64: what hard negatives are for is the siblings a
# random batch rarely holds, and a batch of B from N documents in clusters of C holds one
# for about B * C / N of the queries (40% at 256 here, 10% at 64: the same as 256 from
# 80k documents, at a quarter of the time an epoch).
QUALITY_BATCH = 64
QUALITY_SETS = [
    f"train.batch_size={QUALITY_BATCH}",
    f"train.effective_batch_size={QUALITY_BATCH}",
    f"mining.refresh_steps={NUM_DOCS // QUALITY_BATCH}",
]
# Experiments: BENCH_MINING_SETS="twotower.cluster_size=64 train.batch_size=256 ..." (applied last).
ENV_SETS = os.environ.get("BENCH_MINING_SETS", "").split()



def _build(state_dir: Path, *extra: str) -> tuple[Trainer, TwoTowerTask, MiningHook | None, MinerState]:
    run, _, state = cpu_run([f"paths.state_dir={state_dir}", *SETS, *extra, *ENV_SETS])
    hook = next((c for c in run.components if isinstance(c, MiningHook)), None)
    assert isinstance(run.task, TwoTowerTask)
    return run.trainer, run.task, hook, state


class _Sync:
    """Negatives of each micro-batch mined for its own queries while the trainer waits."""

    def __init__(self, hook: MiningHook) -> None:
        self.hook = hook
        # Same config and bank as the async miner, its own thread and queues.
        self.miner = HardNegativeMiner(hook.miner.cfg, hook.miner.bank, CollectorRegistry(), seed=1)
        self.miner.start()

    def __call__(self, step: int, batch: TwoTowerBatch, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        self.miner.observe_docs(batch.ids, d.detach())
        key = self.hook.key(batch.pos.epoch, batch.pos.index)
        qd = q.detach()
        if self.miner.submit(key, key, qd, batch.ids):
            while self.miner.miner.ready_count == 0 and self.miner.miner.alive:
                time.sleep(0.0002)
        return self.miner.negatives(key, key, qd, batch.ids)[0]


class _BusyFaiss:
    """A thread that runs the async miner's searches (its index, batches of random unit
    queries) while ``running`` is set: the cost of a busy FAISS core alone, no hook work."""

    def __init__(self, hook: MiningHook) -> None:
        self.hook = hook
        self.running = threading.Event()
        self.searches = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="bench-busy-faiss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        load_faiss().omp_set_num_threads(self.hook.miner.cfg.faiss_threads)
        miner = self.hook.miner
        dim = miner.bank.dim
        rng = np.random.default_rng(0)
        while not self._stop:
            index = miner.miner._index
            if not self.running.wait(0.05) or index is None:
                continue
            q = rng.standard_normal((BATCH, dim)).astype(np.float32)
            q /= np.linalg.norm(q, axis=1, keepdims=True)
            index.search(q, miner.miner._k)
            self.searches += 1

    def stop(self) -> None:
        self._stop = True
        self.running.set()
        self._thread.join(10)


# The throughput part trains the default model (hidden 1024: ~60-80 ms a step here, close to
# the 13 steps a second reported for this job on a GPU before mining). The quality runs train
# it too: a smaller model (hidden 256, ~10 ms a step) outran one FAISS thread, so ~70% of its
# mining steps fell back to the memory bank and the comparison measured the fallback, not mining.
THROUGHPUT_HIDDEN = 1024
QUALITY_HIDDEN = 1024


def _throughput(tmp: Path, quick: bool) -> tuple[float, float, float, float]:
    trainer, task, hook, _ = _build(tmp, f"mining.start_epoch={START_EPOCH}",
                                    f"twotower.hidden_dim={THROUGHPUT_HIDDEN}")
    assert hook is not None
    while trainer.progress.epoch < START_EPOCH:  # epoch 1 fills the banks
        trainer.inner_step()
    for _ in range(20):  # the miner starts, builds its index and settles
        trainer.inner_step()
    n = hook.miner.cfg.num_negatives
    fixed = torch.nn.functional.normalize(torch.randn(256, n, TwoTowerConfig.of(trainer.cfg).embed_dim), dim=-1)

    def free(step: int, batch: TwoTowerBatch, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return fixed

    sync = _Sync(hook)
    busy = _BusyFaiss(hook)

    def free_busy(step: int, batch: TwoTowerBatch, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        busy.running.set()
        return fixed

    variants: dict[str, Callable[..., torch.Tensor | None]] = {
        "async": hook, "free": free, "sync": sync, "free_busy": free_busy,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    before = dict(hook.miner.status()["batches"])
    steps = 15 if quick else 30
    for _ in range(3 if quick else 6):
        for name, fn in variants.items():
            task.negatives = fn
            spent, counted = 0.0, 0
            for _ in range(steps):
                epoch = trainer.progress.epoch
                t0 = time.perf_counter()
                trainer.inner_step()
                dt = time.perf_counter() - t0
                if trainer.progress.epoch == epoch:  # not a step that ended an epoch (evaluation)
                    spent += dt
                    counted += 1
            times[name].append(spent / counted)
            busy.running.clear()
    task.negatives = hook
    after = hook.miner.status()["batches"]
    used = {k: after[k] - before[k] for k in after}
    fresh_share = (used["fresh"] + used["reused"]) / max(1, sum(used.values()))
    busy.stop()
    sync.miner.stop(10)
    hook.stop(10)
    t = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'variant':<10}{'ms/step':>10}{'steps/s':>10}")
    for k, v in t.items():
        print(f"{k:<10}{v * 1e3:>10.2f}{1 / v:>10.1f}")
    print(f"async blocks: sources {used} (fresh or reused {fresh_share:.3f}, blocks start cold)")
    print(f"free_busy/free {t['free_busy'] / t['free']:.3f}: what a FAISS thread searching on the other "
          f"core costs the trainer by itself ({busy.searches} searches of {BATCH} queries)")
    return t["free"] / t["async"], t["sync"] / t["async"], t["free"] / t["free_busy"], fresh_share


def _train(
    tmp: Path, epochs: int, mining: bool
) -> tuple[list[tuple[float, float, float]], dict[str, object] | None]:
    """Per epoch (recall@10, separation, recall@1), and the miner's status at the end."""
    trainer, _, hook, _ = _build(
        tmp, f"train.epochs={epochs}", f"mining.enabled={'true' if mining else 'false'}",
        f"mining.start_epoch={START_EPOCH}", f"twotower.hidden_dim={QUALITY_HIDDEN}", *QUALITY_SETS,
    )
    evals: list[tuple[float, float, float]] = []
    epoch = trainer.progress.epoch
    while trainer.progress.epoch <= epochs:
        trainer.inner_step()
        if trainer.progress.epoch != epoch:
            epoch = trainer.progress.epoch
            m = trainer.last_eval
            evals.append((m["recall_at_10"], m["separation_margin"], m["recall_at_1"]))
    status = None
    if hook is not None:
        status = hook.miner.status()
        hook.stop(10)
    return evals, status


def main(quick: bool) -> None:
    torch.set_num_threads(1)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    load_faiss()  # imported once, after torch, before any timing
    tmp = Path(tempfile.mkdtemp(prefix="bench-mining-"))
    over_free, over_sync, busy_over_free, freshness = _throughput(tmp / "tp", quick)

    epochs = 4 if quick else 10
    base, _ = _train(tmp / "base", epochs, mining=False)
    mined, status = _train(tmp / "mined", epochs, mining=True)
    assert status is not None
    counts = status["batches"]
    assert isinstance(counts, dict)
    freshness_quality = (counts["fresh"] + counts["reused"]) / max(1, sum(counts.values()))
    print(f"\n{'epoch':<7}{'r@10 in-batch':>15}{'r@10 mining':>13}{'r@1 in-batch':>14}{'r@1 mining':>12}"
          f"{'Δ in-batch':>12}{'Δ mining':>10}")
    for i, ((rb, sb, r1b), (rm, sm, r1m)) in enumerate(zip(base, mined, strict=True), start=1):
        print(f"{i:<7}{rb:>15.3f}{rm:>13.3f}{r1b:>14.3f}{r1m:>12.3f}{sb:>12.4f}{sm:>10.4f}")
    print(f"mining run: sources {counts}, searches {status['searches']}, stale {status['stale']}, "
          f"mean age {status['mean_age_steps']} steps")
    gain = (mined[-1][0] - base[-1][0]) * 100
    separation = mined[min(10, epochs) - 1][1]
    result(
        "mining",
        async_over_free=over_free,
        async_over_sync=over_sync,
        free_busy_over_free=busy_over_free,
        freshness=freshness,
        freshness_quality_run=freshness_quality,
        recall10_gain_points=gain,
        separation_epoch10=separation,
    )
