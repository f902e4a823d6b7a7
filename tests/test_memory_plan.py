"""The memory plan (daemon/memory_plan.py) against the bytes real tensors take on the CPU.

Activations are measured two ways: the tensors autograd saves for the backward (a
saved_tensors_hooks pack hook, each storage counted once, the parameters left out), and
the peak of live storages during the backward (a dispatch mode that sees every tensor an
operation makes and a finalizer that sees it freed). Peak RSS would also count the
allocator's caching and the libraries, which the plan leaves to its margin.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from daemon import memory_plan
from daemon.config import Config
from daemon.engine.outer import OuterOptimizer
from daemon.run.catalog import CATALOG
from daemon.tasks.causal_lm.config import LmConfig
from daemon.tasks.causal_lm.model import build_model
from tests.conftest import ROOT, cli

CPU = torch.device("cpu")
VOCAB = 512  # the smallest lm.vocab_size: the logits do not drown the blocks in the totals
TINY = ["train.task=causal_lm", "lm.preset=tiny", f"lm.vocab_size={VOCAB}", "train.batch_size=4", "lm.seq_len=128",
        "train.device=cpu", "train.effective_batch_size=4"]


def tiny_cfg(*extra: str) -> Config:
    return CATALOG.load(None, [*TINY, *extra])


def tiny_model(cfg: Config, device: torch.device = CPU) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(LmConfig.of(cfg), VOCAB, None, device)
    model.train()
    return model


def batch(cfg: Config) -> torch.Tensor:
    lm = LmConfig.of(cfg)
    return torch.randint(0, VOCAB, (cfg.train.batch_size, lm.seq_len + 1), generator=torch.Generator().manual_seed(1))


def loss_of(model: nn.Module, ids: torch.Tensor, amp: bool) -> torch.Tensor:
    """As the causal_lm task computes it (daemon/tasks/causal_lm/task.py), under the trainer's autocast."""
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with ctx:
        logits = model(input_ids=ids[:, :-1], use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())


def nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def checkpointing(model: Any) -> None:
    # Per decoder block, non-reentrant; transformers 5 names gradient_checkpointing_enable this (a
    # deprecated alias that warns).
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def saved_bytes(model: nn.Module, ids: torch.Tensor, amp: bool) -> tuple[int, dict[int, int]]:
    """Bytes autograd saves for the backward (each storage once, parameters left out) and the
    share of each decoder block, by which block was running when a tensor was saved."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, int]] = {}
    running = [-1]
    hooks = []
    for i, layer in enumerate(model.get_submodule("model.layers").children()):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: running.__setitem__(0, i)))
        hooks.append(layer.register_forward_hook(lambda m, a, o: running.__setitem__(0, -1)))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), (running[0], storage.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, ids, amp)
    loss.backward()
    for hook in hooks:
        hook.remove()
    blocks: dict[int, int] = {}
    for block, size in seen.values():
        blocks[block] = blocks.get(block, 0) + size
    return sum(size for _, size in seen.values()), blocks


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages made under this mode and not yet freed, and their peak; storages
    that existed before (``existing``: parameters, gradients) are not counted."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.skip = {t.untyped_storage().data_ptr() for t in existing}
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self.live or key in self.skip or storage.nbytes() == 0:
                    continue
                self.live[key] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)


def backward_peak(model: nn.Module, ids: torch.Tensor, amp: bool) -> int:
    """Peak bytes of activations and their gradients over one forward and backward. The
    gradients exist beforehand, as in every step after the first with accumulation, so
    that only the backward's own working memory is counted here."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    mode = LiveBytes([*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None)])
    with mode:
        loss = loss_of(model, ids, amp)
        mode.peak = mode.now  # the forward's own transients (the logits before the loss) end before the backward
        loss.backward()
        del loss
    return mode.peak


def close(planned: int, measured: int, tolerance: float = 0.10) -> bool:
    return abs(planned - measured) <= tolerance * measured


class TestOneRank:
    """World size 1, the tiny Llama on the CPU: the plan is the bytes the real tensors take."""

    def test_parameters_gradients_adamw_and_outer_state(self) -> None:
        cfg = tiny_cfg()
        model = tiny_model(cfg)
        plan = memory_plan.plan(cfg, 1, model, CPU)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False, fused=False)
        loss_of(model, batch(cfg), amp=False).backward()
        optimizer.step()
        outer = OuterOptimizer(list(model.parameters()), lr=0.7, momentum=0.9)
        params = list(model.parameters())
        moments = [t for s in optimizer.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
        assert plan.parameters == nbytes(params)
        assert plan.gradients == nbytes(p.grad for p in params)
        assert plan.adamw == nbytes(moments)
        assert plan.outer == nbytes([*outer.anchor, *outer.buf])

    @pytest.mark.parametrize("mode", ["fp32", "autocast", "bf16 weights"])
    def test_activations_are_the_saved_tensors(self, mode: str) -> None:
        """Without checkpointing: every saved tensor. With it: each block's input and what the
        rest keeps, plus one block's full set (measured without checkpointing) while it is
        recomputed. autocast: bf16 over fp32 weights, as the trainer runs on CUDA (here on the
        CPU); bf16 weights: as FSDP2's mixed precision gathers them on CUDA, planned for CUDA."""
        sets = {"fp32": ["train.amp=off"], "autocast": ["train.amp=bf16"],
                "bf16 weights": ["train.amp=bf16", "train.sharding=fsdp"]}[mode]
        cfg = tiny_cfg(*sets)
        model = tiny_model(cfg)
        device = CPU
        if mode == "bf16 weights":
            model.to(torch.bfloat16)
            device = torch.device("cuda")
        planned = memory_plan.plan(cfg, 1, model, device, capacity=1 << 40).activations
        assert planned is not None
        autocast = mode == "autocast"
        full, blocks = saved_bytes(model, batch(cfg), autocast)
        checkpointing(model)
        kept, _ = saved_bytes(model, batch(cfg), autocast)
        one_block = max(size for block, size in blocks.items() if block >= 0)
        assert close(planned.full, full), (planned.full, full)
        assert close(planned.block, one_block), (planned.block, one_block)
        assert close(planned.checkpointed, kept + one_block), (planned.checkpointed, kept + one_block)

    @pytest.mark.parametrize("ckpt", [False, True])
    def test_backward_peak(self, ckpt: bool) -> None:
        """The backward's peak: what is kept plus the loss gradient; under checkpointing what
        is kept plus the larger of one recomputed block and the loss gradient."""
        cfg = tiny_cfg(f"train.activation_checkpointing={str(ckpt).lower()}")
        model = tiny_model(cfg)
        if ckpt:
            checkpointing(model)
        planned = memory_plan.plan(cfg, 1, model, CPU).activation_peak
        measured = backward_peak(model, batch(cfg), amp=False)
        assert close(planned, measured), (planned, measured)


@pytest.mark.integration
@pytest.mark.slow
class TestFsdpTwoRanks:
    """World size 2 under FSDP2 (torchrun, gloo): each rank's shards are the plan's."""

    def test_shards_match_the_plan(self) -> None:
        cfg = tiny_cfg("train.sharding=fsdp")
        plan = memory_plan.plan(cfg, 2, CATALOG.meta_model(cfg), CPU)
        lm = LmConfig.of(cfg)
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(ROOT / "tests" / "scripts" / "fsdp_bytes.py"), str(VOCAB), str(cfg.train.batch_size),
                str(lm.seq_len)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-4000:]
        reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        assert sorted(r["rank"] for r in reports) == [0, 1]
        for r in reports:
            assert close(plan.parameters, r["parameters"]), (plan.parameters, r)
            assert close(plan.gradients, r["gradients"]), (plan.gradients, r)
            assert close(plan.adamw, r["adamw"]), (plan.adamw, r)
            assert close(plan.gathered, r["gathered"]), (plan.gathered, r)  # fp32 on the CPU


class TestDiagnoseCommand:
    """`minerd diagnose --world-size N` prints the plan after the GPU DIAGNOSTICS block."""

    def test_an_8b_model_over_four_ranks_is_planned_in_seconds(self, tmp_path: Path) -> None:
        t0 = time.monotonic()
        code, out, err = cli("diagnose", "--world-size", "4", "--set", "lm.preset=llama-8b",
                             "--set", "train.sharding=fsdp", "--set", f"paths.state_dir={tmp_path / 's'}")
        assert code == 0, err[-2000:]
        assert time.monotonic() - t0 < 60
        assert out.index("GPU DIAGNOSTICS") < out.index("MEMORY PLAN (per rank)")
        assert "World size: 4; sharding: fsdp" in out and "Vocabulary assumed: 8192" in out
        assert "Model device: not built" in out
        assert not (tmp_path / "s").exists()

    def test_json_carries_the_plan(self, tmp_path: Path) -> None:
        code, out, err = cli("diagnose", "--json", "--world-size", "2", *(a for s in TINY for a in ("--set", s)),
                             "--set", "train.sharding=fsdp", "--set", f"paths.state_dir={tmp_path / 's'}")
        assert code == 0, err[-2000:]
        plan = json.loads(out)["memory_plan"]
        assert plan["world_size"] == 2 and plan["sharded"] and plan["vocab"] == VOCAB
        assert plan["device_total"] >= plan["parameters"] + plan["gradients"] + plan["adamw"]

    def test_a_task_without_an_activation_model(self, tmp_path: Path) -> None:
        code, out, err = cli("diagnose", "--world-size", "2", "--set", "train.task=twotower",
                             "--set", f"paths.state_dir={tmp_path / 's'}")
        assert code == 0, err[-2000:]
        assert "not estimated for this model" in out

    @pytest.mark.parametrize("bad", ["0", "-2"])
    def test_a_bad_world_size_is_one_line_and_exit_2(self, bad: str) -> None:
        code, out, err = cli("diagnose", "--world-size", bad)
        assert code == 2 and not out
        assert len(err.strip().splitlines()) == 1 and "--world-size" in err


class TestRefusal:
    """A plan over its CUDA device's usable memory is refused in one line; one under it is not."""

    @pytest.fixture
    def meta_model(self) -> Iterator[nn.Module]:
        yield CATALOG.meta_model(tiny_cfg())

    def test_over_and_under(self, meta_model: nn.Module) -> None:
        cfg = tiny_cfg("train.device=cuda")
        need = memory_plan.plan(cfg, 1, meta_model, torch.device("cuda"), capacity=1 << 40).device_total
        small = memory_plan.plan(cfg, 1, meta_model, torch.device("cuda"), capacity=need)
        why = memory_plan.refusal(small)
        assert why is not None and "\n" not in why and "train.activation_checkpointing=true" in why
        enough = int(need / (1 - memory_plan.MARGIN)) + 1
        roomy = memory_plan.plan(cfg, 1, meta_model, torch.device("cuda"), capacity=enough)
        assert memory_plan.refusal(roomy) is None

    def test_not_for_a_cpu_or_an_unknown_device(self, meta_model: nn.Module) -> None:
        cfg = tiny_cfg()
        assert memory_plan.refusal(memory_plan.plan(cfg, 1, meta_model, CPU, capacity=1)) is None
        unknown = memory_plan.plan(tiny_cfg("train.device=cuda"), 1, meta_model, torch.device("cuda"))
        if not torch.cuda.is_available():
            assert unknown.capacity is None and memory_plan.refusal(unknown) is None


class TestPlanModel:
    def test_a_model_to_continue_from_is_planned_from_its_config_alone(self, tmp_path: Path) -> None:
        """lm.init_from's weights are never read to plan it: its config.json gives the shapes."""
        cfg = tiny_cfg()
        src = tiny_model(cfg)
        src.save_pretrained(str(tmp_path / "m"))
        (tmp_path / "m" / "model.safetensors").write_bytes(b"not read")  # would fail if it were
        planned = CATALOG.meta_model(tiny_cfg(f"lm.init_from={tmp_path / 'm'}"))
        assert {p.device.type for p in planned.parameters()} == {"meta"}
        assert sum(p.numel() for p in planned.parameters()) == sum(p.numel() for p in src.parameters())
