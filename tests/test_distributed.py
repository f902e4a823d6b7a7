"""Two processes under torchrun (CPU, gloo): DDP, DiLoCo, rank-aware checkpoints, a dying rank.

Each runs for both tasks: the language model (the default job) and the two-tower model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from daemon.logsetup import json_records
from tests.conftest import ROOT, TASKS, finish, task_sets

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def launch(task: str, state: Path, *extra: str, log: Path) -> subprocess.Popen[bytes]:
    sets = task_sets(task, state, "api.port=0", "telemetry.param_digest=true", "train.warmup_steps=2", *extra)
    args = [*TORCHRUN, "-m", "daemon", "run"]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)


def events(log: Path) -> list[dict]:
    return json_records(log.read_text(errors="replace"))


def run_to_end(task: str, state: Path, *extra: str, tmp: Path, timeout: float = 240) -> list[dict]:
    log = tmp / f"torchrun-{time.monotonic_ns()}.log"
    return finish(launch(task, state, *extra, log=log), log, timeout)


def same_embedding_tables(task: str, evs: list[dict]) -> None:
    """The ID-embedding tables end identical on both ranks (row gradients are all-gathered)."""
    if task != "twotower":
        return
    closed = {e["rank"]: e["table_digest"] for e in evs if e.get("event") == "embedding table final"}
    assert set(closed) == {0, 1} and closed[0] == closed[1], closed


def steps_by_rank(evs: list[dict]) -> dict[int, dict[int, dict]]:
    out: dict[int, dict[int, dict]] = defaultdict(dict)
    for e in evs:
        if "param_digest" in e:
            out[e["rank"]][e["global_step"]] = e
    return out


class TestDdp:
    """DDP: gradients averaged every inner step, so the ranks' parameters never differ."""

    @pytest.mark.parametrize("task", TASKS)
    def test_identical_every_step_and_loss_falls(self, tmp_path: Path, task: str) -> None:
        batch = "train.effective_batch_size=256" if task == "twotower" else "train.effective_batch_size=32"
        evs = run_to_end(task, tmp_path / "s", "train.sync=ddp", "train.max_steps=20", batch, tmp=tmp_path)
        by_rank = steps_by_rank(evs)
        assert sorted(by_rank[0]) == sorted(by_rank[1]) == list(range(1, 21))
        for step in range(1, 21):
            assert by_rank[0][step]["param_digest"] == by_rank[1][step]["param_digest"], step
        losses = [by_rank[0][s]["loss"] for s in range(1, 21)]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
        same_embedding_tables(task, evs)


class TestDiloco:
    """DiLoCo: ranks drift apart within an outer step and agree right after it."""

    # Compressed outer syncs decode every rank's encoding in rank order on every rank: the
    # same bits, so the same update and the same parameters, as with the dense all-reduce.
    # The codec is the same for every task (the two-tower artifact: tests/test_compression.py).
    @pytest.mark.parametrize(("task", "codec"), [("causal_lm", "dct_topk"), ("twotower", "none")])
    def test_identical_after_outer_steps_only(self, tmp_path: Path, task: str, codec: str) -> None:
        evs = run_to_end(task, tmp_path / "s", "train.sync=diloco", "train.max_steps=21",
                         "train.inner_steps_per_outer=7", f"train.outer_compression={codec}", tmp=tmp_path)
        by_rank = steps_by_rank(evs)
        for step in range(1, 22):
            same = by_rank[0][step]["param_digest"] == by_rank[1][step]["param_digest"]
            assert same == (step % 7 == 0), step
        losses = [by_rank[0][s]["loss"] for s in range(1, 22)]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
        same_embedding_tables(task, evs)
        stopped = {e["rank"]: e for e in evs if e.get("event") == "training stopped"}
        assert set(stopped) == {0, 1}
        if codec != "none":
            syncs = [e for e in evs if e.get("event") == "outer step applied" and e.get("rank") == 0]
            assert len(syncs) == 3 and all(e["sync_bytes"] > 0 for e in syncs)
            if task == "causal_lm":  # the two-tower's embedding rows travel every inner step too
                assert all(e["sync_ratio"] >= 32 for e in syncs), syncs


class TestEpochCoverage:
    """The ranks' shares of an epoch are disjoint and together cover it exactly once."""

    @pytest.mark.parametrize(("task", "sync"), [("twotower", "ddp"), ("twotower", "diloco"), ("causal_lm", "ddp")])
    def test_every_sample_once(self, tmp_path: Path, task: str, sync: str) -> None:
        script = ROOT / "tests" / "scripts" / "epoch_cover.py"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        out = subprocess.run([*TORCHRUN, str(script), str(tmp_path / "s"), sync, task], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        line = next(x for x in out.stdout.splitlines() if x.startswith("EPOCH_COVER"))
        assert line.endswith("ok=True"), line
        if task == "twotower":
            assert "total=2048 unique=2048 expected=2048 items=2048 per_rank=[1024, 1024]" in line


class TestRankZeroOwnsState:
    """Only rank 0 writes checkpoints and uploads; both ranks resume at the same step."""

    @pytest.mark.parametrize("task", TASKS)
    def test_checkpoints_uploads_and_resume(self, tmp_path: Path, task: str) -> None:
        state = tmp_path / "s"
        up = ("upload.enabled=true", "upload.min_inner_step=2", "upload.every_inner_steps=2")
        evs = run_to_end(task, state, "train.max_steps=8", *up, tmp=tmp_path)
        saved = [e for e in evs if e.get("event") == "checkpoint saved"]
        assert saved and {e["rank"] for e in saved} == {0}
        uploads = [e for e in evs if str(e.get("event", "")).startswith("UPLOAD OK")]
        assert uploads and {e["rank"] for e in uploads} == {0}
        assert (state / "uploads" / "LATEST").exists()
        evs = run_to_end(task, state, "train.max_steps=12", *up, tmp=tmp_path)
        resumed = [e for e in evs if str(e.get("event", "")).startswith("Resumed from checkpoint")]
        assert {e["rank"] for e in resumed} == {0, 1}
        assert all("(global step 8)" in e["event"] for e in resumed)
        by_rank = steps_by_rank(evs)
        assert sorted(by_rank[0]) == sorted(by_rank[1]) == [9, 10, 11, 12]


class TestTextCorpus:
    """The two-tower task on a text corpus (the code corpus of this repository's sources) under
    DDP: rank 0 tokenizes, rank 1 reads the cache; the ranks agree every step; rank 0 uploads a
    revision that verify-upload passes; DiLoCo agrees after its outer steps."""

    def test_ddp_upload_and_diloco(self, tmp_path: Path) -> None:
        from daemon.upload import verify_target

        text = ("twotower.corpus=code", f"twotower.code_paths={ROOT / 'daemon'}", "twotower.vocab_size=512",
                "twotower.eval_queries=50", "train.batch_size=32", "train.effective_batch_size=64")
        up = ("upload.enabled=true", "upload.min_inner_step=4", "upload.every_inner_steps=4")
        state = tmp_path / "s"
        evs = run_to_end("twotower", state, *text, *up, "train.sync=ddp", "train.max_steps=8", tmp=tmp_path)
        made = [e for e in evs if e.get("event") == "retrieval pairs tokenized"]
        assert len(made) == 1 and made[0]["rank"] == 0, made
        by_rank = steps_by_rank(evs)
        assert sorted(by_rank[0]) == sorted(by_rank[1]) == list(range(1, 9))
        assert all(by_rank[0][s]["param_digest"] == by_rank[1][s]["param_digest"] for s in range(1, 9))
        same_embedding_tables("twotower", evs)
        assert {e["rank"] for e in evs if str(e.get("event", "")).startswith("UPLOAD OK")} == {0}
        assert verify_target(str(state / "uploads")) == []
        evs = run_to_end("twotower", tmp_path / "d", *text, "train.sync=diloco", "train.max_steps=6",
                         "train.inner_steps_per_outer=3", tmp=tmp_path)
        by_rank = steps_by_rank(evs)
        for step in range(1, 7):
            assert (by_rank[0][step]["param_digest"] == by_rank[1][step]["param_digest"]) == (step % 3 == 0), step


    def test_ddp_from_a_pretrained_encoder(self, tmp_path: Path) -> None:
        """Towers from a BERT-like encoder (twotower.init_from): every weight gets a gradient
        (its pooler is left out), so DDP runs, and the ranks agree every step."""
        from tests.test_retrieval_pretrained import model_dir
        from tests.test_retrieval_text import rows, write_jsonl

        folder = model_dir(tmp_path / "bert", kind="bert", hidden=48)
        pairs = write_jsonl(tmp_path / "p.jsonl", rows())
        evs = run_to_end("twotower", tmp_path / "s", "twotower.corpus=pairs", f"twotower.pairs={pairs}",
                         f"twotower.init_from={folder}", "twotower.eval_fraction=0.1", "twotower.eval_queries=50",
                         "train.batch_size=16", "train.effective_batch_size=32", "train.sync=ddp",
                         "train.max_steps=4", tmp=tmp_path)
        by_rank = steps_by_rank(evs)
        assert sorted(by_rank[0]) == sorted(by_rank[1]) == [1, 2, 3, 4]
        assert all(by_rank[0][s]["param_digest"] == by_rank[1][s]["param_digest"] for s in range(1, 5))


class TestDeadRank:
    """A rank killed by SIGKILL ends the job promptly with a non-zero exit; a relaunch resumes."""

    @pytest.mark.parametrize("task", TASKS)
    def test_kill_one_rank(self, tmp_path: Path, task: str) -> None:
        state = tmp_path / "s"
        log = tmp_path / "dead.log"
        proc = launch(task, state, "train.dist_timeout_seconds=30", "checkpoint.every_inner_steps=3", log=log)
        try:
            deadline = time.monotonic() + 120
            victim = None
            while time.monotonic() < deadline and victim is None:
                evs = events(log)
                ckpt = any(e.get("event") == "checkpoint saved" for e in evs)
                pids = {e["rank"]: e["pid"] for e in evs if e.get("event") == "minerd starting" and "rank" in e}
                if ckpt and 1 in pids:
                    victim = pids[1]
                time.sleep(0.1)
            assert victim, log.read_text()[-3000:]
            os.kill(victim, signal.SIGKILL)
            t0 = time.monotonic()
            code = proc.wait(60)
            assert code != 0
            assert time.monotonic() - t0 < 45
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        good = sorted(p.name for p in (state / "checkpoints").glob("step-*"))
        last = int(good[-1].split("-")[1])
        evs = run_to_end(task, state, f"train.max_steps={last + 2}", tmp=tmp_path)
        resumed = [e for e in evs if str(e.get("event", "")).startswith("Resumed from checkpoint")]
        assert {e["rank"] for e in resumed} == {0, 1}
        assert all(f"(global step {last})" in e["event"] for e in resumed)
