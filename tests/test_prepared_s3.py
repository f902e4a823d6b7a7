"""Prepared datasets across processes and through a real S3-compatible server (moto): the CLI,
a prepare killed with SIGKILL, training streamed from a bucket through a bounded cache with an
exact resume, and a miner that waits for an unreachable bucket instead of exiting."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from daemon.data.prepared.dataset import locate
from daemon.data.prepared.index import INDEX
from daemon.data.prepared.record import ids_digest, sample_ids
from daemon.run.local import cpu_run
from tests.conftest import BUCKET, LM_CORPUS, ROOT, MotoServer, free_port, get_json

pytestmark = pytest.mark.integration

MINERD = [sys.executable, "-m", "daemon"]
DATASET = f"s3://{BUCKET}/datasets/json"


def minerd(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MINERD, *args], cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    srv = MotoServer(tmp_path / "moto.log")
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": srv.url}.items():
        monkeypatch.setenv(key, value)
    srv.start()
    yield srv
    srv.stop()


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


class TestTheCommandLine:
    def test_a_prepare_killed_mid_shard_resumes_to_the_same_bytes(self, tmp_path: Path) -> None:
        sources = LM_CORPUS[:2]  # email and http: about 300k tokens
        common = ["--shard-tokens", "4000", "--vocab-size", "1024", "--eval-fraction", "0.05"]
        done = minerd("data", "prepare", *sources, "--out", str(tmp_path / "a"), "--workers", "1", *common)
        assert done.returncode == 0, done.stderr
        shutil.copy(tmp_path / "a" / "tokenizer.json", tmp_path / "tokenizer.json")
        common += ["--tokenizer", str(tmp_path / "tokenizer.json")]
        kills = 0
        while kills < 2:  # SIGKILL twice while shards are being written, with 2 worker processes
            proc = subprocess.Popen([*MINERD, "data", "prepare", *sources, "--out", str(tmp_path / "b"),
                                     "--workers", "2", *common], cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:  # a shard line: the next one is being cut
                if line.startswith("  train-") and int(line.split("-")[1][:6]) >= 10 * (kills + 1):
                    break
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            kills += 1
            assert not (tmp_path / "b" / INDEX).exists() and (tmp_path / "b" / "prepare.json").exists()
        finished = minerd("data", "prepare", *sources, "--out", str(tmp_path / "b"), "--workers", "2", *common)
        assert finished.returncode == 0, finished.stderr
        assert files(tmp_path / "a") == files(tmp_path / "b")
        # Nothing new: a third run writes nothing and says so.
        again = minerd("data", "prepare", *sources, "--out", str(tmp_path / "b"), *common)
        assert again.returncode == 0 and "nothing new to prepare" in again.stdout

    def test_inspect_verify_and_sample_replayed_by_another_process(self, tmp_path: Path) -> None:
        out = tmp_path / "d"
        assert minerd("data", "prepare", LM_CORPUS[2], "--out", str(out), "--shard-tokens", "5000",
                      "--vocab-size", "1024", "--eval-fraction", "0.2").returncode == 0
        inspect = minerd("data", "inspect", str(out), "--verify")
        assert inspect.returncode == 0 and "verified" in inspect.stdout and "train:" in inspect.stdout
        args = ["data", "sample", "--dataset", str(out), "--seed", "5", "--replica", "1", "--replicas", "2",
                "--rank", "1", "--world-size", "2", "--window", "3", "--set", "lm.seq_len=16",
                "--set", "train.batch_size=2", "--set", "train.effective_batch_size=4",
                "--set", "train.inner_steps_per_outer=5"]
        first, second = minerd(*args), minerd(*args)
        assert first.returncode == 0 and first.stdout == second.stdout
        ids = np.array([int(x) for x in first.stdout.split()])
        index = locate("lm.dataset", str(out)).index
        assert np.array_equal(ids, sample_ids(index, 5, 16, 2, 2, 1, 1, 2, 5, 3)) and len(ids) == 10
        digest = minerd(*args, "--digest")
        assert digest.stdout.strip() == ids_digest(ids)
        # A flipped byte: inspect --verify names the shard and exits 1.
        shard = out / index.shards[0].name
        data = bytearray(shard.read_bytes())
        data[3] ^= 0xFF
        shard.write_bytes(bytes(data))
        bad = minerd("data", "inspect", str(out), "--verify")
        assert bad.returncode == 1 and f"{index.shards[0].name}: sha256 does not match" in bad.stderr

    @pytest.mark.parametrize(("args", "expected"), [
        (["data", "inspect", "/nonexistent"], "DEST: /nonexistent holds no index.json"),
        (["data", "sample", "--dataset", "/nonexistent"], "--dataset: /nonexistent holds no index.json"),
        (["data", "prepare", "/nonexistent", "--out", "/tmp/x"], "SOURCE"),
        (["data", "sample", "--dataset", "/tmp", "--rank", "2"], "--rank: 2 is outside --world-size 1"),
    ])
    def test_bad_input_is_one_line_and_exit_2(self, args: list[str], expected: str) -> None:
        done = minerd(*args)
        assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


class TestStreaming:
    def _prepared(self, tmp_path: Path) -> None:
        done = minerd("data", "prepare", LM_CORPUS[2], "--out", DATASET, "--shard-tokens", "3000",
                      "--vocab-size", "1024", "--eval-fraction", "0.2")
        assert done.returncode == 0, done.stderr
        inspect = minerd("data", "inspect", DATASET, "--verify")
        assert inspect.returncode == 0, inspect.stderr

    def _run(self, state: Path, cache: Path, bound: int, steps: int) -> list[float]:
        run = cpu_run([f"paths.state_dir={state}", "train.task=causal_lm", f"lm.dataset={DATASET}",
                       f"lm.cache_dir={cache}", f"lm.cache_bytes={bound}", "lm.seq_len=32", "train.batch_size=4",
                       "train.effective_batch_size=4", "lm.eval_sequences=4", "lm.eval_every_steps=1000",
                       "upload.enabled=false", "checkpoint.every_inner_steps=3", "train.inner_steps_per_outer=50",
                       f"train.max_steps={steps}"]).run
        t = run.trainer
        t.resume()
        losses = []
        while t.progress.global_step < steps:
            t.inner_step()
            losses.append(t.last_loss)
        t.checkpoint("stop")
        run.task.data.reader.close()  # type: ignore[attr-defined]
        return losses

    def test_bounded_cache_and_exact_resume_after_fetching_again(self, s3: MotoServer, tmp_path: Path) -> None:
        self._prepared(tmp_path)
        index = locate("lm.dataset", DATASET).index
        bound = 3 * max(s.bytes for s in index.shards)
        samples: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                total = 0
                for p in (tmp_path / "cache").rglob("*"):
                    with contextlib.suppress(FileNotFoundError):  # renamed or evicted while summing
                        total += p.stat().st_size if p.is_file() else 0
                samples.append(total)
                time.sleep(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            straight = self._run(tmp_path / "straight", tmp_path / "cache", bound, 40)
        finally:
            stop.set()
            sampler.join()
        assert len(samples) > 100 and max(samples) <= bound
        # Resumed from a checkpoint after the cache was lost: fetched again, the same losses.
        first = self._run(tmp_path / "resumed", tmp_path / "cache2", bound, 21)
        shutil.rmtree(tmp_path / "cache2")
        rest = self._run(tmp_path / "resumed", tmp_path / "cache2", bound, 40)
        assert first + rest == straight

    def test_a_miner_waits_for_an_unreachable_bucket(self, tmp_path: Path, miner_factory,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
        port = free_port()
        srv = MotoServer(tmp_path / "moto.log", port)
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": srv.url}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        miner = miner_factory(tmp_path / "m", [
            f"paths.state_dir={tmp_path / 'm'}", "train.task=causal_lm", f"lm.dataset={DATASET}", "lm.seq_len=32",
            "train.batch_size=4", "train.effective_batch_size=4", "lm.eval_sequences=4", "upload.enabled=false",
            "api.port=0", "telemetry.log_format=json", "train.max_steps=200", "lm.vocab_size=1024"], env=env)
        try:
            url = miner.api_url()
            miner.wait_for("DATASET UNREACHABLE", 120)
            code, body = get_json(url + "/readyz")
            assert code == 503 and "dataset unreachable" in json.dumps(body), body
            srv.start()
            self._prepared(tmp_path)
            miner.wait_for("Outer Step:", 120)
            assert miner.proc.poll() is None
            code, status = get_json(url + "/status")
            assert status["data"]["dataset"] == DATASET and status["data"]["shards_cached"] >= 1
        finally:
            srv.stop()
