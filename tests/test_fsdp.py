"""A sharded language model (train.sharding=fsdp) under torchrun on CPU (gloo).

What must hold: FSDP trains what DDP trains (same losses, same weights after outer steps),
sharded checkpoints survive kill -9 mid-write and resume exactly, a job of another world
size (or a process alone) resumes the same weights, and a revision is the training model.
The weights of a sharded checkpoint are read here with torch.distributed.checkpoint
directly, not through minerd's code, so the comparison does not trust what it checks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from daemon.checkpoint import CheckpointStore
from daemon.logsetup import json_records
from daemon.sharding import weights_digest
from tests.conftest import ROOT, cli, finish, task_sets

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 20
FSDP = "train.sharding=fsdp"


def _args(n: int | None, state: Path, extra: tuple[str, ...]) -> list[str]:
    sets = task_sets("causal_lm", state, "api.port=0", "telemetry.param_digest=true", "train.warmup_steps=2",
                     "checkpoint.min_interval_seconds=0", *extra)
    head = [sys.executable, "-m", "daemon", "run"] if n is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "daemon", "run"]
    for s in sets:
        head += ["--set", s]
    return head


def launch(n: int | None, state: Path, *extra: str, log: Path) -> subprocess.Popen[bytes]:
    """``n`` ranks under torchrun, or a process alone (None)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(_args(n, state, extra), cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env=env)


def run(n: int | None, state: Path, *extra: str, tmp: Path, timeout: float = 300) -> list[dict]:
    log = tmp / f"run-{time.monotonic_ns()}.log"
    return finish(launch(n, state, *extra, log=log), log, timeout)


def steps(evs: list[dict]) -> dict[int, dict[int, dict]]:
    out: dict[int, dict[int, dict]] = defaultdict(dict)
    for e in evs:
        if "param_digest" in e and "global_step" in e:
            out[e.get("rank", 0)][e["global_step"]] = e
    return out


def resumed(evs: list[dict]) -> dict:
    found = [e for e in evs if str(e.get("event", "")).startswith("Resumed from checkpoint") and e.get("rank", 0) == 0]
    assert len(found) == 1, found
    return found[0]


def whole(ckpt: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's whole weights, tied weights once: a sharded one read with DCP alone."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    if manifest.get("format") != "sharded":
        return load_file(str(ckpt / "model.safetensors"))
    meta = dcp.FileSystemReader(str(ckpt / "shards")).read_metadata()
    keys = {k.removeprefix("model."): v.size for k, v in meta.state_dict_metadata.items()
            if k.startswith("model.") and hasattr(v, "size")}
    template = {"model": {k: torch.empty(size) for k, size in keys.items()}}
    dcp.load(template, checkpoint_id=str(ckpt / "shards"))
    weights = template["model"]
    if "lm_head.weight" in weights and torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"]):
        del weights["lm_head.weight"]  # tied: once, as the plain checkpoints and revisions hold it
    return weights


def checkpoint(state: Path, step: int) -> Path:
    return state / "checkpoints" / f"step-{step:010d}"


class TestAgainstDdp:
    def test_same_losses_and_weights_after_outer_steps(self, tmp_path: Path) -> None:
        """Same seed, same data: DDP and FSDP agree on every rank's loss for 20 steps, and the
        weights after two outer steps (DiLoCo's anchor and momentum sharded) agree."""
        ddp = steps(run(2, tmp_path / "ddp", "train.sync=ddp", f"train.max_steps={STEPS}", tmp=tmp_path))
        evs = run(2, tmp_path / "fsdp", FSDP, f"train.max_steps={STEPS}", tmp=tmp_path)
        fsdp = steps(evs)
        lines = [e["event"] for e in evs if str(e.get("event", "")).startswith("Sharding:")]
        assert len(lines) == 2 and all(line.startswith("Sharding: fsdp over 2 ranks: ") for line in lines), lines
        assert "M of " in lines[0] and lines[0].endswith("parameters on this rank")
        worst = 0.0
        for rank in (0, 1):
            assert sorted(ddp[rank]) == sorted(fsdp[rank]) == list(range(1, STEPS + 1))
            for step in range(1, STEPS + 1):
                a, b = ddp[rank][step]["loss"], fsdp[rank][step]["loss"]
                worst = max(worst, abs(a - b) / abs(a))
        assert worst <= 1e-3, worst
        outer = [e for e in evs if e.get("event") == "outer step applied" and e.get("rank") == 0]
        assert len(outer) == STEPS // 7
        plain, sharded = whole(checkpoint(tmp_path / "ddp", STEPS)), whole(checkpoint(tmp_path / "fsdp", STEPS))
        assert set(plain) == set(sharded)
        for name in plain:
            torch.testing.assert_close(sharded[name], plain[name], rtol=1e-3, atol=2e-5, msg=name)


class TestCheckpoints:
    def test_kill9_mid_checkpoint_then_exact_resume(self, tmp_path: Path) -> None:
        """SIGKILL while the ranks write a sharded checkpoint: every complete checkpoint still
        verifies, the next start resumes from the newest, and ends where a run never killed ends."""
        every = ("checkpoint.every_inner_steps=1", "train.max_steps=12")
        straight = steps(run(2, tmp_path / "a", FSDP, *every, tmp=tmp_path))
        state = tmp_path / "b"
        log = tmp_path / "killed.log"
        proc = launch(2, state, FSDP, *every, log=log)
        ckpts = state / "checkpoints"
        caught = False
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and not caught:
                complete = list(ckpts.glob("step-*")) if ckpts.is_dir() else []
                writing = list(ckpts.glob(".tmp-step-*")) if ckpts.is_dir() else []
                if complete and writing:
                    pids = [e["pid"] for e in json_records(log.read_text(errors="replace"))
                            if e.get("event") == "minerd starting"]
                    for pid in [*pids, proc.pid]:
                        os.kill(pid, signal.SIGKILL)
                    caught = True
                time.sleep(0.002)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        assert caught, log.read_text()[-3000:]
        assert list(ckpts.glob(".tmp-step-*")), "killed outside a checkpoint write"
        store = CheckpointStore(ckpts, 3)
        good = store.checkpoints()
        assert good
        for path in good:
            store.verify(path)  # complete and intact
        newest = int(good[0].name.split("-")[1])
        assert newest < 12
        evs = run(2, state, FSDP, *every, tmp=tmp_path)
        assert f"(global step {newest})" in resumed(evs)["event"]
        assert not list(ckpts.glob(".tmp-step-*"))
        again = steps(evs)
        for rank in (0, 1):
            assert again[rank][12]["param_digest"] == straight[rank][12]["param_digest"]
            assert again[rank][12]["loss"] == straight[rank][12]["loss"]

    def test_resume_with_another_world_size(self, tmp_path: Path) -> None:
        """2 ranks -> 1 rank -> 2 ranks, then a process alone and back: each start resumes the
        very weights the checkpoint holds."""
        state = tmp_path / "s"
        run(2, state, FSDP, "train.max_steps=6", tmp=tmp_path)
        plan = [(1, (FSDP, "train.max_steps=8"), 6), (2, (FSDP, "train.max_steps=10"), 8),
                (None, ("train.max_steps=12",), 10), (2, (FSDP, "train.max_steps=14"), 12)]
        for n, extra, step in plan:
            expected = weights_digest(whole(checkpoint(state, step)))
            evs = run(n, state, *extra, tmp=tmp_path)
            line = resumed(evs)
            assert f"(global step {step})" in line["event"], (n, line)
            assert line["weights_digest"] == expected, (n, step)
        sharded = json.loads((checkpoint(state, 14) / "manifest.json").read_text())
        assert sharded["format"] == "sharded" and sharded["world_size"] == 2


class TestRevision:
    def test_revision_is_the_training_model(self, tmp_path: Path) -> None:
        """The revision gathered from the shards verifies, loads with transformers, and gives the
        logits of the model the checkpoint of the same step holds; above upload.shard_bytes its
        weights are split into Hugging Face shards."""
        from transformers import AutoModelForCausalLM, LlamaForCausalLM

        state = tmp_path / "s"
        run(2, state, FSDP, "train.max_steps=8", "train.inner_steps_per_outer=100", "upload.enabled=true",
            "upload.min_inner_step=1", "upload.every_inner_steps=4", "upload.min_interval_seconds=0",
            "upload.artifact=both", "upload.shard_bytes=4194304", tmp=tmp_path)
        rev = state / "uploads" / "rev-0-8"
        assert (state / "uploads" / "LATEST").read_text().strip() == "rev-0-8"
        assert (rev / "model.safetensors.index.json").is_file() and not (rev / "model.safetensors").exists()
        code, out, err = cli("verify-upload", str(state / "uploads"))
        assert code == 0, out + err
        loaded = AutoModelForCausalLM.from_pretrained(str(rev), local_files_only=True, trust_remote_code=False,
                                                      dtype=torch.float32)
        trained = LlamaForCausalLM(loaded.config)
        weights = whole(checkpoint(state, 8))
        missing, unexpected = trained.load_state_dict(weights, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
        trained.tie_weights()
        x = torch.randint(0, loaded.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=x).logits, trained(input_ids=x).logits, rtol=0, atol=1e-5)


class TestTorchft:
    def test_groups_of_sharded_ranks_recover_rank_by_rank(self, tmp_path: Path) -> None:
        """Two replica groups of two FSDP ranks each, DiLoCo across them through torchft: each rank
        averages its shards with the same rank of the other group; a group killed and restarted
        takes, rank by rank, the slices of the live group, and all agree again."""
        from tests.conftest import free_port
        from tests.test_ft import (
            TorchrunGroup,
            group_digests,
            group_sets,
            start_groups,
            start_lighthouse,
            stop,
            wait_until,
        )

        port = free_port()
        lighthouse = start_lighthouse(port, 1, tmp_path / "lighthouse.log")
        groups: list[TorchrunGroup] = []

        def sets(i: int) -> list[str]:
            return group_sets(tmp_path, port, i, FSDP, "train.outer_offload=true", task="causal_lm")

        try:
            groups = start_groups(tmp_path, sets)
            a, b = groups
            b.kill()
            b = groups[1] = TorchrunGroup(tmp_path / "g1", sets(1))
            wait_until(lambda: sum(str(e.get("event", "")).startswith("FT RECOVERED") for e in b.events()) == 2,
                       180, "both ranks of the restarted group recovering", *groups)
            joined = max(e["global_step"] for e in b.events() if str(e.get("event", "")).startswith("FT RECOVERED"))

            def agreeing() -> list[int]:
                """Steps after the recovery at which each rank's slices are equal in both groups."""
                return [s for s, v in group_digests(groups, joined).items() if len(v) == 4
                        and v[(0, 0)] == v[(1, 0)] and v[(0, 1)] == v[(1, 1)] and v[(0, 0)] != v[(0, 1)]]

            wait_until(lambda: bool(agreeing()), 120, "equal slices rank by rank after the recovery", *groups)
            assert min(agreeing()) <= joined + 5
            assert "Traceback" not in a.text()
        finally:
            for g in groups:
                g.kill()
            stop(lighthouse)
