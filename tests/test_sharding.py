"""Sharding's refusals and the parts of it that run in one process (no torchrun).

The sharded runs themselves (FSDP against DDP, kill -9, other world sizes, revisions)
are in tests/test_fsdp.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from daemon.engine.outer import OuterOptimizer
from daemon.engine.sharded import ShardedState
from daemon.run.local import cpu_run
from daemon.sharding import unique_names, weights_digest, whole_weights
from tests.conftest import cli, small_lm_sets


def _one_line(code: int, out: str, err: str, key: str) -> str:
    assert code == 2, out + err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, lines
    assert key in lines[0] and "Traceback" not in out + err
    return lines[0]


class TestRefusals:
    @pytest.mark.parametrize("setting", ["train.sharding=fsdp", "train.compile=true",
                                         "train.activation_checkpointing=true"])
    def test_two_tower_has_no_blocks(self, setting: str) -> None:
        line = _one_line(*cli("config", "validate", "--set", "train.task=twotower", "--set", setting),
                         setting.split("=")[0])
        assert "causal_lm" in line  # says which task can

    @pytest.mark.parametrize(("setting", "key"), [("train.amp=fp16", "train.amp"),
                                                  ("train.outer_compression=topk", "train.outer_compression")])
    def test_fsdp_conflicts(self, setting: str, key: str) -> None:
        _one_line(*cli("config", "validate", "--set", "train.sharding=fsdp", "--set", setting), key)

    def test_fsdp_needs_torchrun(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ("MASTER_ADDR", "RANK", "WORLD_SIZE"):
            monkeypatch.delenv(name, raising=False)
        code, out, err = cli("run", "--set", "train.sharding=fsdp", "--set", f"paths.state_dir={tmp_path / 's'}",
                             "--set", "api.enabled=false", "--set", "telemetry.log_format=console")
        assert code == 2
        refused = [line for line in (out + err).splitlines() if "train.sharding" in line]
        assert len(refused) == 1 and "torchrun" in refused[0], out + err
        assert "Traceback" not in out + err
        assert not (tmp_path / "s" / "checkpoints").exists()


    def test_a_plan_over_the_gpu_is_refused_before_anything_is_built(self, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
        """On a (pretended) 24 GB GPU, llama-8b alone cannot fit: one line, exit 2, before the
        model exists (nothing is allocated, no state written)."""
        import daemon.memory_plan
        import daemon.run.runner

        monkeypatch.setattr(daemon.run.runner, "resolve_device", lambda cfg, launch: torch.device("cuda", 0))
        monkeypatch.setattr(daemon.memory_plan, "device_memory", lambda device: 24 << 30)
        code, out, err = cli("run", "--set", "lm.preset=llama-8b", "--set", f"paths.state_dir={tmp_path / 's'}",
                             "--set", "api.enabled=false", "--set", "telemetry.log_format=console")
        assert code == 2
        refused = [line for line in (out + err).splitlines() if "memory plan" in line]
        assert len(refused) == 1 and "GB" in refused[0] and "train.sharding=fsdp" in refused[0], out + err
        assert "Traceback" not in out + err
        assert not (tmp_path / "s" / "checkpoints").exists()


class TestOneProcess:
    def test_activation_checkpointing_changes_no_number(self, tmp_path: Path) -> None:
        """Recomputing activations gives the same gradients: the same losses and weights."""
        results = []
        for i, ac in enumerate(("false", "true")):
            run = cpu_run(small_lm_sets(tmp_path / f"s{i}", "train.max_steps=3", "checkpoint.every_inner_steps=1000",
                                        f"train.activation_checkpointing={ac}")).run
            trainer = run.trainer
            losses = []
            for _ in range(3):
                trainer.inner_step()
                losses.append(trainer.last_loss)
            results.append((losses, weights_digest(whole_weights(trainer.model))))
            if ac == "true":
                model = trainer.model
                assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        assert results[0] == results[1]

    def test_compile_is_per_block(self, tmp_path: Path) -> None:
        run = cpu_run(small_lm_sets(tmp_path / "s", "train.compile=true")).run
        layers = run.trainer.model.model.layers
        assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in layers)
        assert getattr(run.trainer.model, "_compiled_call_impl", None) is None  # the loss and embeddings stay eager

    def test_sharded_state_round_trip_without_a_group(self, tmp_path: Path) -> None:
        """The checkpoint format of a sharded model, written and read by a process alone: the
        weights, AdamW's moments and the outer state come back exactly."""
        run = cpu_run(small_lm_sets(tmp_path / "a", "train.inner_steps_per_outer=2")).run
        for _ in range(3):
            run.trainer.inner_step()
        assert run.optimizer is not None
        src = ShardedState(run.trainer.model, run.optimizer, run.outer)
        src.save(tmp_path / "shards")
        other = cpu_run(small_lm_sets(tmp_path / "b", "train.seed=99", "train.inner_steps_per_outer=2")).run
        assert other.optimizer is not None
        dst = ShardedState(other.trainer.model, other.optimizer, other.outer)
        assert weights_digest(whole_weights(other.trainer.model)) != weights_digest(whole_weights(run.trainer.model))
        dst.load(tmp_path / "shards")
        assert weights_digest(whole_weights(other.trainer.model)) == weights_digest(whole_weights(run.trainer.model))
        for a, b in zip(run.outer.state_dict()["anchor"], other.outer.state_dict()["anchor"], strict=True):
            assert torch.equal(a, b)
        mine, theirs = run.optimizer.state_dict(), other.optimizer.state_dict()
        for i, entry in mine["state"].items():
            for key, value in entry.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(theirs["state"][i][key])), (i, key)

    def test_unique_names_drop_tied_weights(self, tmp_path: Path) -> None:
        model = cpu_run(small_lm_sets(tmp_path / "s")).run.trainer.model
        names = unique_names(model)
        assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
        assert len(names) == len(list(model.parameters()))


class TestOuterOffload:
    def test_offloaded_outer_state_steps_alike(self) -> None:
        """The anchor and momentum in host memory give the very step they give beside the model."""
        torch.manual_seed(0)
        results = []
        for offload in (False, True):
            params = [torch.nn.Parameter(torch.ones(4, 3) * (i + 1)) for i in range(3)]
            outer = OuterOptimizer(params, lr=0.7, momentum=0.9, offload=offload)
            if offload:
                assert all(a.device.type == "cpu" and a.data_ptr() != p.data_ptr()
                           for a, p in zip(outer.anchor, params, strict=True))
            for round_ in range(3):
                with torch.no_grad():
                    for i, p in enumerate(params):
                        p.sub_(0.1 * (i + 1) * (round_ + 1))
                outer.step()
            results.append([p.detach().clone() for p in params])
        for a, b in zip(*results, strict=True):
            assert torch.equal(a, b)
