"""The training engine: exact resume, inner/outer steps, non-finite steps, learning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from daemon.checkpoint import CheckpointStore
from daemon.engine.outer import OuterOptimizer, update_problem
from daemon.engine.protocols import EvalPoint
from daemon.engine.trainer import Trainer
from daemon.errors import TrainingDiverged
from daemon.gpu import GpuProbe
from daemon.metrics import build_core_metrics
from daemon.run.build import Run
from daemon.run.local import cpu_run
from daemon.state import MinerState
from tests.conftest import small_sets


def make(state_dir: Path, *extra: str) -> tuple[Trainer, CollectorRegistry]:
    """The two-tower trainer with ID embeddings on (the task's default), mining off."""
    run, registry, _ = build(state_dir, *extra)
    return run.trainer, registry


def build(state_dir: Path, *extra: str) -> tuple[Run, CollectorRegistry, MinerState]:
    return cpu_run(small_sets(state_dir, "embeddings.enabled=true", *extra))


def table(run: Run, ids: torch.Tensor) -> torch.Tensor:
    return run.stateful["embeddings"].store.get_embeddings(ids)  # type: ignore[attr-defined]


def params(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in t.model.state_dict().items()}


class TestResume:
    """N steps, stop, N more steps equals 2N steps straight (same seed, CPU)."""

    @pytest.mark.parametrize("storage", ["memory", "disk"])
    def test_exact(self, tmp_path: Path, storage: str) -> None:
        # 2048 docs / 64 per micro-batch = 32 micro-batches = 16 inner steps an epoch:
        # 20 steps cross an epoch boundary (with its evaluation) and two outer steps (every 7).
        mode = f"embeddings.storage_mode={storage}"
        tiny_cache = ("embeddings.chunk_size=256", "embeddings.cache_l1_mb=0.05", "embeddings.cache_l2_mb=0.05")
        first, _ = make(tmp_path / "a", "train.max_steps=10", mode, *tiny_cache)
        assert first.run() == "max_steps"
        first.checkpoint("stop")
        second_run, _, _ = build(tmp_path / "a", "train.max_steps=20", mode, *tiny_cache)
        second = second_run.trainer
        assert second.resume()
        p = second.progress
        assert (p.global_step, p.outer_step, p.inner_step) == (10, 1, 3)
        second.run()
        straight_run, _, _ = build(tmp_path / "b", "train.max_steps=20", mode, *tiny_cache)
        straight = straight_run.trainer
        straight.run()
        ids = torch.arange(straight_run.task.num_items)
        emb_a, emb_b = table(second_run, ids), table(straight_run, ids)
        assert torch.equal(emb_a, emb_b)
        assert not torch.equal(emb_a, table(build(tmp_path / "c", mode)[0], ids))
        assert straight.progress == second.progress
        assert straight.progress.epoch == 2
        a, b = params(second), params(straight)
        assert all(torch.equal(a[k], b[k]) for k in a)

    def test_exact_through_a_checkpoint_of_changed_rows(self, tmp_path: Path) -> None:
        """A checkpoint every step: after the first, each holds only the table rows (and their
        Adam state) changed since a whole one; resuming from such a checkpoint is exact too."""
        every = ("checkpoint.every_inner_steps=1", "checkpoint.min_interval_seconds=0")
        first_run, _, _ = build(tmp_path / "a", "train.max_steps=7", *every)
        first = first_run.trainer
        first.run()
        newest = first_run.store.checkpoints()[0]
        base = CheckpointStore.depends_on(newest)
        assert base and newest.name == "step-0000000007"
        size = (newest / "train_state.safetensors").stat().st_size
        assert size < (first_run.store.root / base[0] / "train_state.safetensors").stat().st_size / 2
        assert first.checkpoint_bytes() > sum(f.stat().st_size for f in newest.iterdir())
        second_run, _, _ = build(tmp_path / "a", "train.max_steps=12", *every)
        second = second_run.trainer
        assert second.resume() and second.progress.global_step == 7
        second.run()
        straight_run, _, _ = build(tmp_path / "b", "train.max_steps=12")
        straight = straight_run.trainer
        straight.run()
        # The table and the row optimiser's moments and step counts.
        rows_a = second_run.stateful["embeddings"].state_dict()["rows"].tensors
        rows_b = straight_run.stateful["embeddings"].state_dict()["rows"].tensors
        assert rows_a.keys() == {"table", "exp_avg", "exp_avg_sq", "steps"} == rows_b.keys()
        assert all(torch.equal(rows_a[k], rows_b[k]) for k in rows_a)
        a, b = params(second), params(straight)
        assert all(torch.equal(a[k], b[k]) for k in a)

    def test_different_seed_differs(self, tmp_path: Path) -> None:
        one, _ = make(tmp_path / "a", "train.max_steps=3")
        one.run()
        two, _ = make(tmp_path / "b", "train.max_steps=3", "train.seed=99")
        two.run()
        assert not all(torch.equal(x, y) for x, y in zip(params(one).values(), params(two).values(), strict=True))


class TestSteps:
    """Inner steps restart after each outer step; outer steps move the anchor."""

    def test_counters(self, tmp_path: Path) -> None:
        t, reg = make(tmp_path, "train.max_steps=15")
        t.run()
        p = t.progress
        assert (p.outer_step, p.inner_step, p.global_step) == (2, 1, 15)
        assert reg.get_sample_value("minerd_inner_steps_total") == 15
        assert reg.get_sample_value("minerd_samples_total") == 15 * 128
        assert reg.get_sample_value("minerd_outer_step") == 2
        assert reg.get_sample_value("minerd_step_duration_seconds_count") == 15
        # the anchor equals the parameters right after an outer step
        t2, _ = make(tmp_path / "x", "train.max_steps=7")
        t2.run()
        anchor = t2.training_state()["outer"]["anchor"]
        for a, p in zip(anchor, t2.model.parameters(), strict=True):
            assert torch.equal(a, p.detach())

    def test_checkpoint_time_floor(self, tmp_path: Path) -> None:
        """Periodic checkpoints follow the step schedule, but never sooner than
        checkpoint.min_interval_seconds after the last one."""
        for floor, expected in ((0, 3), (3600, 1)):
            t, reg = make(tmp_path / str(floor), "train.max_steps=6", "checkpoint.every_inner_steps=2",
                          f"checkpoint.min_interval_seconds={floor}")
            t.run()
            assert reg.get_sample_value("minerd_checkpoints_total") == expected, floor

    def test_nonfinite_step_is_skipped_and_counted(self, tmp_path: Path) -> None:
        run, reg, _ = build(tmp_path, "train.max_steps=4", "train.max_nonfinite_in_row=100")
        t, task = run.trainer, run.task
        real_loss = task.loss
        calls = {"n": 0}

        def sometimes_nan(model, batch, step):  # our own seam: the task's loss
            calls["n"] += 1
            out = real_loss(model, batch, step)
            return out * float("nan") if calls["n"] in (3, 4) else out

        task.loss = sometimes_nan  # type: ignore[method-assign]
        before = None
        t.inner_step()
        before = params(t)
        assert t.inner_step() == "nonfinite"
        after = params(t)
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert reg.get_sample_value("minerd_nonfinite_steps_total") == 1
        assert t.progress.global_step == 1

    def test_restores_last_good_checkpoint_after_too_many(self, tmp_path: Path) -> None:
        run, _, _ = build(tmp_path, "train.max_steps=5", "train.max_nonfinite_in_row=2")
        t, task = run.trainer, run.task
        t.run()
        t.checkpoint("stop")
        good = params(t)
        task.loss = lambda model, batch, step: torch.tensor(float("nan"), requires_grad=True)  # type: ignore
        t.inner_step()
        t.inner_step()
        assert t.progress.global_step == 5 and t.progress.nonfinite_in_row == 0
        assert all(torch.equal(good[k], v) for k, v in params(t).items())


class TestPoison:
    """A poisoned state is never saved, never applied, and never looped on for ever."""

    def test_a_restore_that_cannot_train_ends_the_run(self, tmp_path: Path) -> None:
        run, _, state = build(tmp_path, "train.max_steps=5", "train.max_nonfinite_in_row=2")
        t, task = run.trainer, run.task
        t.run()
        t.checkpoint("stop")
        real_loss = task.loss
        task.loss = lambda model, batch, step: torch.tensor(float("nan"), requires_grad=True)  # type: ignore
        t.inner_step()
        t.inner_step()  # the second in a row: the last good checkpoint is restored
        assert state.live_problem is not None and "restored" in state.live_problem
        t.inner_step()
        with pytest.raises(TrainingDiverged, match="again after restoring"):
            t.inner_step()
        # A finite step after a restore is recovery: the flag and /livez's reason go.
        run2, _, state2 = build(tmp_path / "b", "train.max_steps=5", "train.max_nonfinite_in_row=2")
        run2.trainer.run()
        run2.trainer.checkpoint("stop")
        run2.task.loss = lambda model, batch, step: torch.tensor(float("nan"), requires_grad=True)  # type: ignore
        run2.trainer.inner_step()
        run2.trainer.inner_step()
        assert state2.live_problem is not None
        run2.task.loss = real_loss  # type: ignore[method-assign]
        assert run2.trainer.inner_step() == "ok" and state2.live_problem is None

    def test_no_checkpoint_holds_a_non_finite_tensor(self, tmp_path: Path) -> None:
        from structlog.testing import capture_logs

        run, reg, _ = build(tmp_path, "train.max_steps=3")
        run.trainer.run()
        with torch.no_grad():
            next(run.trainer.model.parameters())[0] = float("nan")
        with capture_logs() as logs:
            run.trainer.checkpoint("stop")
        assert [e["event"] for e in logs if e["event"].startswith("CHECKPOINT REFUSED")], logs
        assert run.store.checkpoints() == [] and reg.get_sample_value("minerd_checkpoints_total") == 0

    def test_a_non_finite_average_is_not_applied(self) -> None:
        params = [torch.zeros(3, requires_grad=True)]
        def poisoned(grads: list[torch.Tensor]) -> None:  # a peer's NaN in the average
            grads[0].fill_(float("nan"))

        outer = OuterOptimizer(params, lr=0.7, momentum=0.9, reduce=poisoned)
        with torch.no_grad():
            params[0].add_(1.0)
        report = outer.step()
        assert report["committed"] is False and "not finite" in report["error"]
        assert torch.equal(outer.anchor[0], torch.zeros(3))  # the anchor stays where it was

    def test_update_problem(self) -> None:
        ok = [torch.ones(4)]
        assert update_problem(ok, 2.0, 10) is None
        assert "over 10 times" in str(update_problem([torch.full((4,), 100.0)], 2.0, 10))
        assert update_problem([torch.full((4,), 100.0)], 2.0, 0) is None  # the norm check off
        assert update_problem([torch.full((4,), 100.0)], 0.0, 10) is None  # nothing of its own to compare
        assert "not finite (1 values)" in str(update_problem([torch.tensor([1.0, float("inf")])], 2.0, 10))


@pytest.mark.slow
class TestLearning:
    """A short run beats an untrained model on held-out queries."""

    def test_recall_improves(self, tmp_path: Path) -> None:
        run, _, _ = build(tmp_path, "train.epochs=2", "twotower.num_docs=4096", "train.lr=0.003")
        t = run.trainer
        untrained = run.task.evaluate(t.model, run.device, EvalPoint(0, 0), lambda: None).metrics["recall_at_10"]
        t.run()
        trained = t.last_eval["recall_at_10"]
        assert trained > untrained + 0.3, (untrained, trained)


class TestStepLines:
    """The step and slow-step lines keep the format operators grep for."""

    def test_formats(self) -> None:
        from structlog.testing import capture_logs

        from daemon.config import TelemetryConfig
        from daemon.telemetry import StepReporter, step_line

        assert step_line(56, 84, 0.000021, 3.4, 15.2, 18.45) == (
            "Outer Step: 56 | Inner Step: 84 | LR: 0.00002100 | Loss: 3.40 | Step Time: 15.2s | GPU Mem: 18.45GB"
        )
        reg = CollectorRegistry()
        metrics = build_core_metrics(reg, MinerState(), GpuProbe())
        reporter = StepReporter(TelemetryConfig(), metrics, torch.device("cpu"))
        with capture_logs() as logs:
            reporter.report(1, 0, 1, 0.001, 2.0, 245.7, 256)
        assert "SLOW STEP: 245.7s (expected 10-30s) - Check GPU usage!" in [e["event"] for e in logs]
        assert reg.get_sample_value("minerd_slow_steps_total") == 1
