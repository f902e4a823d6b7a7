"""A real `minerd run` subprocess: signals, exit codes, checkpoints, kill -9 (both tasks)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from daemon.logsetup import json_records
from tests.conftest import TASKS, small_sets, task_sets

pytestmark = [pytest.mark.integration]


def step_lines(text: str) -> list[dict]:
    return [e for e in json_records(text) if str(e.get("event", "")).startswith("Outer Step:")]


class TestGracefulStop:
    """SIGINT (pm2) and SIGTERM (systemd) finish the step, checkpoint, and exit 0."""

    @pytest.mark.parametrize(("task", "sig"), [("causal_lm", signal.SIGINT), ("twotower", signal.SIGTERM)])
    def test_signal(self, tmp_path: Path, miner_factory, task: str, sig: int) -> None:
        state = tmp_path / "state"
        # A key under its old name (the two-tower task's temperature was train.temperature):
        # read, and said once at start.
        old = ("train.temperature=0.05",) if task == "twotower" else ()
        m = miner_factory(state, task_sets(task, state, "checkpoint.every_inner_steps=100000", "api.enabled=false",
                                           *old))
        m.wait_for("Outer Step:")
        m.signal(sig)
        assert m.wait(60) == 0, m.text()[-2000:]
        text = m.text()
        assert '"reason": "stop"' in text and "minerd stopped" in text
        moved = [e for e in m.events() if str(e.get("event", "")).startswith("DEPRECATED: config key")]
        assert [e["event"] for e in moved] == ([
            "DEPRECATED: config key train.temperature is now twotower.temperature; the old name is read until the "
            "next release"] if old else []) and all(e["level"] == "warning" for e in moved)
        built = next(e for e in m.events() if e.get("event") == "run assembled")
        assert (built["task"], built["outer_sync"]) == (task, "none")
        assert built["data_source"] == ("text" if task == "causal_lm" else "generated")
        last = step_lines(text)[-1]["global_step"]
        ckpts = sorted((state / "checkpoints").glob("step-*"))
        assert ckpts and ckpts[-1].name == f"step-{last:010d}"

    @pytest.mark.parametrize("task", TASKS)
    def test_resume_continues_where_it_stopped(self, tmp_path: Path, miner_factory, task: str) -> None:
        state = tmp_path / "state"
        m = miner_factory(state, task_sets(task, state, "train.max_steps=12", "api.enabled=false"))
        assert m.wait(90) == 0, m.text()[-2000:]
        m2 = miner_factory(state, task_sets(task, state, "train.max_steps=20", "api.enabled=false"))
        assert m2.wait(90) == 0, m2.text()[-2000:]
        text = m2.text()
        assert "Resumed from checkpoint at outer step 1, inner step 5 (global step 12)" in text
        # The diagnostics block: its red flags (CPU here) at warning level, the rest at info.
        block = json_records(text)
        flags = [e for e in block if e["event"].startswith("RED FLAG")]
        assert flags and all(e["level"] == "warning" for e in flags)
        assert any(e["event"] == "GPU DIAGNOSTICS" and e["level"] == "info" for e in block)
        assert [s["global_step"] for s in step_lines(text)] == list(range(13, 21))
        if task == "causal_lm":  # the second start reads the tokenizer and the prepared corpus back
            assert "tokenizer reused" in text and "prepared corpus reused" in text
            assert "dataset prepared" not in text and "tokenizer trained" not in text

    def test_bad_config_exits_2_and_writes_nothing(self, tmp_path: Path, miner_factory) -> None:
        state = tmp_path / "state"
        m = miner_factory(state, small_sets(state, "train.effective_batch_size=100"))
        assert m.wait(30) == 2
        assert "config error: train.effective_batch_size" in m.text() and "Traceback" not in m.text()
        assert not state.exists()


@pytest.mark.slow
class TestKillDuringCheckpoint:
    """SIGKILL in the middle of a checkpoint write: the next run starts from the previous good one."""

    @pytest.mark.parametrize("task", TASKS)
    def test_kill_while_saving(self, tmp_path: Path, miner_factory, task: str) -> None:
        state = tmp_path / "state"
        # A large model makes each checkpoint long enough to hit: a few hundred MB for the two-tower
        # model; 63 MB for the language model with its full 8192-token vocabulary, whose tied
        # embedding is stored once (the alias path is killed too).
        large = ["lm.vocab_size=8192"] if task == "causal_lm" else ["twotower.hidden_dim=3072", "train.batch_size=16",
                                                                    "train.effective_batch_size=16"]
        sets = task_sets(task, state, *large, "checkpoint.every_inner_steps=3", "api.enabled=false",
                         "checkpoint.keep=2")
        m = miner_factory(state, sets)
        ckpt_dir = state / "checkpoints"
        deadline = time.monotonic() + 120
        killed_during = None
        while time.monotonic() < deadline and killed_during is None:
            done = list(ckpt_dir.glob("step-*")) if ckpt_dir.exists() else []
            tmps = list(ckpt_dir.glob(".tmp-*")) if ckpt_dir.exists() else []
            if done and tmps:
                m.signal(signal.SIGKILL)
                killed_during = tmps[0].name
            time.sleep(0.002)
        assert killed_during, "never caught a checkpoint in progress"
        m.wait(10)
        good = sorted(p.name for p in ckpt_dir.glob("step-*"))
        assert good, "no complete checkpoint before the kill"
        newest_good = int(good[-1].split("-")[1])
        m2 = miner_factory(state, [*sets, f"train.max_steps={newest_good + 1}"])
        assert m2.wait(120) == 0, m2.text()[-3000:]
        text = m2.text()
        assert f"(global step {newest_good})" in text
        assert "removing an unfinished checkpoint" in text
        assert not list(ckpt_dir.glob(".tmp-*"))
