"""The seams: a task, a data source and an outer sync defined in this file plug into the
registries and run through the one builder, a checkpoint and a resume, touching no file
of the daemon; the registries and the config tree refuse what they cannot mean."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import Field
from torch import nn

from daemon.config import Config, ConfigError, Section, problem
from daemon.engine.outer import OuterOptimizer
from daemon.engine.protocols import BatchPos, EvalPoint, EvalResult, StepContext
from daemon.plugin.entries import DataEntry, DataRequest, Registry, SyncEntry, TaskEntry
from daemon.plugin.parts import BuildContext, SyncContext, SyncParts, TaskParts
from daemon.run.catalog import CATALOG, Catalog
from daemon.run.local import cpu_run
from daemon.upload.layout import WeightsLayout
from tests.conftest import SMALL_JOBS

# ---- a task of this file's own: linear regression on generated points -------------------


class ToyConfig(Section):
    """Its own section, declared here, not in the daemon."""

    key = "toy"
    agreed = "all"

    width: int = Field(8, gt=0)
    points: int = Field(512, ge=16)
    noise: float = Field(0.01, ge=0)


class Points:
    """The data source's product: inputs and targets of a fixed linear map plus noise."""

    def __init__(self, spec: ToyConfig, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(spec.points, spec.width, generator=gen)
        truth = torch.randn(spec.width, 1, generator=gen)
        self.y = self.x @ truth + spec.noise * torch.randn(spec.points, 1, generator=gen)


class ToyTask:
    name = "toy"
    eval_every_steps = 0  # at the end of each epoch

    def __init__(self, data: Points) -> None:
        self.data = data

    @property
    def num_items(self) -> int:
        return len(self.data.x)

    def get_batch(self, idx: torch.Tensor, device: torch.device, pos: BatchPos) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.x.index_select(0, idx).to(device), self.data.y.index_select(0, idx).to(device)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], step: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, at: EvalPoint, beat: Callable[[], None]) -> EvalResult:
        mse = float(nn.functional.mse_loss(model(self.data.x.to(device)), self.data.y.to(device)))
        beat()
        return EvalResult({"mse": mse}, f"Toy eval @ epoch {at.epoch}: mse={mse:.4f}")


class StepCounter:
    """A step hook and a stateful part: counts the applied inner steps it was shown."""

    def __init__(self) -> None:
        self.seen = 0
        self.last: StepContext | None = None

    def before_inner_step(self, step: StepContext) -> None:
        return None

    def after_inner_step(self, step: StepContext) -> None:
        self.seen += 1
        self.last = step

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])


def build_toy(ctx: BuildContext, data: Points) -> TaskParts:
    width = ToyConfig.of(ctx.cfg).width
    model = nn.Linear(width, 1).to(ctx.device)
    counter = StepCounter()
    return TaskParts(
        task=ToyTask(data), model=model, sampler=ctx.sampler(len(data.x)), layout=WeightsLayout(),
        eval_gauges={"mse": ("minerd_eval_toy_mse", "Mean squared error of the toy task")},
        hooks=[counter], stateful={"counter": counter}, sections={"toy": lambda: {"seen": counter.seen}},
    )


def toy_validate(cfg: Config, world_size: int) -> list[str]:
    toy = ToyConfig.of(cfg)
    if cfg.train.batch_size > toy.points:
        return [problem("train.batch_size", f"is larger than toy.points ({toy.points})", cfg.train.batch_size)]
    return []


TOY = TaskEntry(
    name="toy",
    summary="linear regression on generated points",
    sections=(ToyConfig,),
    defaults={"train.batch_size": 32, "train.effective_batch_size": 64},
    renamed={"train.toy_width": "toy.width"},
    validate=toy_validate,
    data=lambda cfg: DataRequest("points", ToyConfig.of(cfg)),
    build=build_toy,
    diagnose_model=lambda cfg, device: nn.Linear(ToyConfig.of(cfg).width, 1).to(device),
)
POINTS = DataEntry(name="points", summary="generated points", build=lambda ctx, spec: Points(spec, ctx.cfg.train.seed))
TOYS = CATALOG.plus(tasks=[TOY], data=[POINTS])


def toy_sets(state_dir: Path, *extra: str) -> list[str]:
    return ["train.task=toy", f"paths.state_dir={state_dir}", "upload.enabled=false", "train.inner_steps_per_outer=4",
            "train.warmup_steps=2", "train.torch_threads=1", "checkpoint.every_inner_steps=3",
            "checkpoint.min_interval_seconds=0", "telemetry.log_format=json", *extra]


class TestTaskFromATestFile:
    """A task registered from this file builds, trains, checkpoints and resumes exactly."""

    def test_build_checkpoint_resume(self, tmp_path: Path) -> None:
        # 512 points / 64 an inner step = 8 inner steps an epoch: 10 steps cross an epoch (and its
        # evaluation), two outer steps (every 4) and three checkpoints (every 3).
        first, registry, state = cpu_run(toy_sets(tmp_path / "a", "train.max_steps=5"), catalog=TOYS)
        assert first.data_source == "points" and first.outer_sync == "none"
        assert first.trainer.run() == "max_steps"
        first.trainer.checkpoint("stop")
        assert first.stateful["counter"].state_dict() == {"seen": 5}  # type: ignore[attr-defined]
        assert state.section("toy") == {"seen": 5}
        second, registry, state = cpu_run(toy_sets(tmp_path / "a", "train.max_steps=10"), catalog=TOYS)
        assert second.trainer.resume() and second.trainer.progress.global_step == 5
        assert second.stateful["counter"].state_dict() == {"seen": 5}  # type: ignore[attr-defined]
        second.trainer.run()
        straight, _, _ = cpu_run(toy_sets(tmp_path / "b", "train.max_steps=10"), catalog=TOYS)
        straight.trainer.run()
        assert second.trainer.progress == straight.trainer.progress
        assert second.trainer.progress.outer_step == 2 and second.trainer.progress.epoch == 2
        a, b = second.trainer.model.state_dict(), straight.trainer.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert second.trainer.last_eval == straight.trainer.last_eval and "mse" in second.trainer.last_eval
        assert registry.get_sample_value("minerd_eval_toy_mse") == second.trainer.last_eval["mse"]
        assert second.stateful["counter"].state_dict() == {"seen": 10}  # type: ignore[attr-defined]

    def test_step_hooks_see_a_context_not_the_trainer(self, tmp_path: Path) -> None:
        run, _, _ = cpu_run(toy_sets(tmp_path, "train.max_steps=4"), catalog=TOYS)
        run.trainer.run()
        step = run.stateful["counter"].last  # type: ignore[attr-defined]
        assert isinstance(step, StepContext)
        assert (step.outer_step, step.inner_step, step.global_step, step.epoch) == (1, 0, 4, 1)
        assert step.model is run.trainer.model and step.loss == run.trainer.last_loss and step.grad_scale == 1.0
        # Right after an outer step the anchor is where the parameters are.
        assert all(torch.equal(a, p) for a, p in zip(step.anchor, step.model.parameters(), strict=True))

    def test_its_section_is_in_the_tree(self, tmp_path: Path) -> None:
        cfg = TOYS.load(sets=toy_sets(tmp_path, "toy.width=4"), environ={})
        assert ToyConfig.of(cfg).width == 4 and cfg.train.batch_size == 32  # the task's defaults
        assert cfg.public_dict()["toy"] == {"width": 4, "points": 512, "noise": 0.01}
        other = TOYS.load(sets=toy_sets(tmp_path, "toy.width=5"), environ={})
        assert cfg.training_digest() != other.training_digest()  # replicas must agree on it
        with pytest.raises(LookupError):
            ToyConfig.of(CATALOG.load(environ={}))  # the daemon's own catalog does not know it

    def test_its_checks_renames_and_the_shared_rules(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError) as exc:
            TOYS.load(sets=toy_sets(tmp_path, "toy.points=16"), environ={})
        assert exc.value.problems == ["config error: train.batch_size: is larger than toy.points (16) (got 32)"]
        cfg = TOYS.load(sets=toy_sets(tmp_path, "train.toy_width=3"), environ={})
        assert ToyConfig.of(cfg).width == 3 and cfg.deprecations == [
            "DEPRECATED: config key train.toy_width is now toy.width; the old name is read until the next release"]
        # Another task's feature switched on with this one: one line, from the catalog.
        with pytest.raises(ConfigError) as exc:
            TOYS.load(sets=toy_sets(tmp_path, "mining.enabled=true"), environ={})
        assert exc.value.problems == [
            "config error: mining.enabled: hard-negative mining needs train.task=twotower (got 'toy')"]


# ---- an outer sync of this file's own ------------------------------------------------------


class LonelyConfig(Section):
    key = "lonely"

    enabled: bool = False
    scale: float = Field(0.5, gt=0, le=1)


class HalfSteps(OuterOptimizer):
    """Applies a scaled pseudo-gradient, and counts its outer steps."""

    def __init__(self, params: list[torch.Tensor], scale: float) -> None:
        super().__init__(params, lr=1.0, momentum=0.0)
        self.scale = scale
        self.steps = 0

    def step(self) -> dict[str, Any]:
        self.steps += 1
        grads = [g.mul_(self.scale) for g in self.pseudo_gradient()]
        return {**self.apply(grads), "lonely": self.steps}


def build_lonely(ctx: SyncContext) -> SyncParts:
    outer = HalfSteps(list(ctx.model.parameters()), LonelyConfig.of(ctx.cfg).scale)
    return SyncParts(outer=outer, model=ctx.model, sections={"lonely": lambda: {"steps": outer.steps}})


LONELY = SyncEntry(
    name="lonely",
    summary="a scaled outer step, alone",
    sections=(LonelyConfig,),
    selects=lambda cfg, world: LonelyConfig.of(cfg).enabled,
    build=build_lonely,
)


class TestOuterSyncFromATestFile:
    """An outer sync registered from this file is selected by its own section and runs."""

    def test_selected_and_run(self, tmp_path: Path) -> None:
        lonely = TOYS.plus(syncs=[LONELY])
        run, _, state = cpu_run(toy_sets(tmp_path, "lonely.enabled=true", "train.max_steps=8"), catalog=lonely)
        assert run.outer_sync == "lonely"
        run.trainer.run()
        assert state.section("lonely") == {"steps": 2} and run.trainer.progress.outer_step == 2
        # Not switched on: the daemon's own choice.
        assert cpu_run(toy_sets(tmp_path / "b"), catalog=lonely).run.outer_sync == "none"

    def test_two_syncs_across_machines_at_once_is_one_line(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError) as exc:
            TOYS.plus(syncs=[LONELY]).load(sets=toy_sets(tmp_path, "lonely.enabled=true", "ft.enabled=true",
                                                         "ft.lighthouse=http://127.0.0.1:29510"), environ={})
        (line,) = [p for p in exc.value.problems if "one outer sync" in p]
        assert "lonely.enabled and ft.enabled are both on" in line


class TestDaemonsOwnChoices:
    """The registered outer syncs are chosen by the config and the launch, in registry order."""

    @pytest.mark.parametrize(("sets", "world", "chosen"), [
        ((), 1, "none"),
        (("train.sync=diloco",), 2, "diloco"),
        (("train.sync=ddp",), 2, "none"),
        (("ft.enabled=true", "ft.lighthouse=http://127.0.0.1:29510", "ft.token_file={token}"), 1, "torchft"),
        (("ft.enabled=true", "ft.lighthouse=http://127.0.0.1:29510", "ft.token_file={token}", "train.sync=ddp"), 2,
         "torchft"),
    ])
    def test_sync_for(self, tmp_path: Path, sets: tuple[str, ...], world: int, chosen: str) -> None:
        (tmp_path / "token").write_bytes(b"0123456789abcdef0123")
        cfg = CATALOG.load(sets=[f"paths.state_dir={tmp_path}", "train.batch_size=8", "train.effective_batch_size=16",
                                 *(s.format(token=tmp_path / "token") for s in sets)], environ={}, world_size=world)
        assert CATALOG.sync_for(cfg, world).name == chosen

    def test_every_registered_task_has_a_small_job_in_the_tests(self) -> None:
        """The tests that run each task (processes, torchrun, kills) run them all."""
        assert set(SMALL_JOBS) == set(CATALOG.tasks.names())

    def test_the_tasks_name_their_data_sources(self) -> None:
        lm = CATALOG.load(environ={})
        two = CATALOG.load(sets=["train.task=twotower"], environ={})
        synthetic = CATALOG.load(sets=["train.task=twotower", "twotower.corpus=synthetic"], environ={})
        assert CATALOG.task_for(lm).data(lm).source == "text"
        assert CATALOG.task_for(two).data(two).source == "pairs"
        assert CATALOG.task_for(synthetic).data(synthetic).source == "generated"


class TestRegistriesRefuse:
    """A registry refuses a second entry of one name; the tree refuses one section declared twice."""

    def test_a_name_twice(self) -> None:
        with pytest.raises(ValueError, match="task 'toy' is registered twice"):
            Registry("task", [TOY, TOY])
        with pytest.raises(ValueError, match="registered twice"):
            CATALOG.plus(tasks=[TOY, TOY])

    def test_a_section_twice(self) -> None:
        class Again(Section):
            key = "lm"

        clash = TaskEntry(name="again", summary="", sections=(Again,), data=TOY.data, build=TOY.build,
                          diagnose_model=TOY.diagnose_model)
        with pytest.raises(ValueError, match="section 'lm' of again is declared by causal_lm already"):
            CATALOG.plus(tasks=[clash])

    def test_a_core_section_is_not_a_parts(self) -> None:
        class Train(Section):
            key = "train"

        clash = TaskEntry(name="again", summary="", sections=(Train,), data=TOY.data, build=TOY.build,
                          diagnose_model=TOY.diagnose_model)
        with pytest.raises(ValueError, match="declared by the core already"):
            Catalog([*CATALOG.tasks, clash], CATALOG.syncs, CATALOG.data)
