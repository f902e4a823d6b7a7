"""Hard-negative mining inside real training runs: sources, queue health, /status, stop."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from daemon.engine.trainer import Trainer
from daemon.run.lifecycle import Lifecycle
from daemon.run.local import cpu_run
from daemon.state import MinerState
from daemon.tasks.twotower.mining.index import load_faiss
from daemon.tasks.twotower.mining.miner import THREAD_NAME
from daemon.tasks.twotower.mining_hook import MiningHook
from tests.conftest import free_port, small_sets

pytestmark = [pytest.mark.integration]

# 2048 docs / 64 = 32 micro-batches an epoch, 2 per inner step: 16 inner steps an epoch.
MINING = [
    "mining.enabled=true",
    "mining.start_epoch=2",
    "mining.qbatch=256",
    "mining.ttl=4",
    "mining.prefetch=2",
    "mining.num_negatives=8",
    "mining.cos_min=-1",
    "mining.cos_max=0.999",
    "telemetry.queue_health_every=4",
    "checkpoint.every_inner_steps=100000",
]


def build(state_dir: Path, *extra: str) -> tuple[Trainer, MiningHook, CollectorRegistry, MinerState]:
    run, registry, state = cpu_run(small_sets(state_dir, *MINING, *extra))
    hook = next(c for c in run.components if isinstance(c, MiningHook))
    trainer = run.trainer
    # The miner thread imports faiss (about a second) when it starts; these runs are
    # only a few seconds long, so import it first to count sources of a warm miner.
    load_faiss()
    return trainer, hook, registry, state


def mining_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def batches(registry: CollectorRegistry, source: str) -> float:
    value = registry.get_sample_value("minerd_mining_batches_total", {"source": source})
    assert value is not None
    return value


class TestTrainingWithMining:
    """A short real run mines from mining.start_epoch on and stops cleanly."""

    def test_sources_health_status_stop_and_learning(self, tmp_path: Path) -> None:
        trainer, hook, registry, state = build(tmp_path, "train.max_steps=48")
        losses: list[float] = []
        life = Lifecycle()
        life.start(hook)
        # 1. Epoch 1 trains without mining: the miner thread has not started.
        with capture_logs() as logs:
            for _ in range(16):
                trainer.inner_step()
                losses.append(trainer.last_loss)
            assert trainer.progress.epoch == 2
            assert not mining_threads()
            assert sum(batches(registry, s) for s in ("fresh", "reused", "fallback")) == 0
            assert hook.miner.bank.filled_count == 2048  # the bank was filled meanwhile
            # 2. Epochs 2 and 3 mine: every micro-batch is counted by its source.
            while trainer.progress.global_step < 48:
                trainer.inner_step()
                losses.append(trainer.last_loss)
        assert trainer.progress.epoch == 4
        counts = {s: batches(registry, s) for s in ("fresh", "reused", "fallback")}
        assert sum(counts.values()) == 64  # 32 inner steps x 2 micro-batches
        assert counts["fresh"] > 0 and counts["fresh"] + counts["reused"] >= 32, counts
        # 3. The queue-health line in the format operators grep for, every 4 inner steps while mining.
        health = [e["event"] for e in logs if e["event"].startswith("[Queue Health @ step")]
        assert len(health) == 8, health
        assert health[0].startswith("[Queue Health @ step 20] in_q=")
        assert ", out_q=" in health[0] and ", fifo=" in health[0]
        # 4. The mining section of /status is JSON, and agrees with the metric.
        section = json.loads(json.dumps(state.sections["mining"]()))
        assert section["started"] and section["alive"] and section["searches"] > 0
        assert section["batches"] == {k: int(v) for k, v in counts.items()}
        assert section["mismatches"] == 0
        # 5. The loss still goes down through the mining epochs.
        mining_losses = losses[16:]
        assert sum(mining_losses[-8:]) / 8 < sum(mining_losses[:8]) / 8, mining_losses
        # 6. A clean stop joins the miner thread within the deadline.
        life.stop_all(5.0)
        assert not mining_threads()

    def test_mining_from_the_first_epoch_encodes_upcoming_queries(self, tmp_path: Path) -> None:
        trainer, hook, registry, _ = build(tmp_path, "mining.start_epoch=1", "train.max_steps=12")
        try:
            assert trainer.run() == "max_steps"
            # No query bank yet for upcoming items: they are encoded ahead, so batches
            # are mined in epoch 1 already (the index grows as the bank fills).
            assert batches(registry, "fresh") > 0
            assert hook.miner.status()["refreshes"] >= 2
        finally:
            hook.stop(5.0)
        assert not mining_threads()

    def test_upcoming_batch_encodes_only_items_without_a_query_embedding(self, tmp_path: Path) -> None:
        trainer, hook, _, _ = build(tmp_path)
        for _ in range(16):  # epoch 1 fills the query bank
            trainer.inner_step()
        qbank = hook.miner.query_bank
        assert qbank is not None and qbank.filled_count == 2048
        key = hook.key(2, 5)
        ids = hook._sampler.batch(2, 5)
        # As if drop_last had left two of this batch's items out of the last epoch.
        missing = ids[[3, 17]].numpy()
        qbank._filled[missing] = False
        qbank._vecs[missing] = 0.0
        qbank._n_filled -= 2
        submitted = []
        hook.miner.submit = lambda step, k, queries, pos: submitted.append((k, queries, pos)) or True  # type: ignore[method-assign]
        hook._submit(trainer.progress.global_step, key)
        (k, queries, pos), = submitted
        assert k == key and torch.equal(torch.as_tensor(pos), ids)
        queries = torch.as_tensor(queries)
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[[3, 17]] = True
        assert torch.equal(queries[~mask], torch.from_numpy(qbank.gather(ids[~mask])))
        expected = hook._encode_queries(ids[mask])
        assert torch.allclose(queries[mask], expected, atol=1e-6)
        assert torch.allclose(queries[mask].norm(dim=1), torch.ones(2), atol=1e-5)  # not the zeroed rows
        hook.stop(5.0)

    def test_disabled_builds_nothing(self, tmp_path: Path) -> None:
        run, registry, state = cpu_run(small_sets(tmp_path))  # mining.enabled=false
        assert not any(isinstance(c, MiningHook) for c in run.components)
        assert run.task.negatives is None and "mining" not in state.sections  # type: ignore[attr-defined]
        assert registry.get_sample_value("minerd_mining_batches_total", {"source": "fresh"}) is None


class TestRunProcessWithMining:
    """`minerd run` with mining on: queue health in the JSON log, /status section, exit 0."""

    def test_run(self, tmp_path: Path, miner_factory) -> None:
        state = tmp_path / "state"
        port = free_port()
        sets = small_sets(state, *MINING, "mining.start_epoch=1", "train.max_steps=400",
                          f"api.port={port}", "shutdown.deadline_seconds=10")
        m = miner_factory(state, sets)
        m.wait_for("[Queue Health @ step 8]")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as resp:
            body = json.loads(resp.read())
        section = json.dumps(body)
        assert '"mining"' in section and '"freshness"' in section, body
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        assert 'minerd_mining_batches_total{source="fresh"}' in metrics
        m.signal(2)  # SIGINT, as pm2 sends
        assert m.wait(60) == 0, m.text()[-2000:]
        text = m.text()
        assert "mining thread exited" in text and "minerd stopped" in text
        assert "did not stop within the deadline" not in text
