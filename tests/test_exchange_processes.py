"""The bucket exchange as users run it: `minerd aggregate` and two `minerd run` miners, as
processes, on a directory and on an S3-compatible server (moto); the aggregator killed with
SIGKILL mid-round and started again."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from daemon.logsetup import json_records
from tests.conftest import BUCKET, ROOT, MotoServer, get_json, small_lm_sets

pytestmark = pytest.mark.integration

ROUND = 3


def common(tmp_path: Path, target: str, name: str) -> list[str]:
    return small_lm_sets(
        tmp_path / name, "exchange.enabled=true", f"exchange.target={target}", f"exchange.miner_id={name}",
        f"train.inner_steps_per_outer={ROUND}", "exchange.poll_seconds=0.2", "exchange.expected_miners=2",
        "exchange.round_seconds=60", "upload.enabled=false", "lm.eval_sequences=8", "api.enabled=false",
        "telemetry.log_format=json", "train.max_steps=100000", "lm.eval_every_steps=100000")


class Aggregator:
    def __init__(self, tmp_path: Path, target: str, env: dict[str, str]) -> None:
        self.log = tmp_path / f"aggregator-{time.monotonic_ns()}.log"
        args = [sys.executable, "-m", "daemon", "aggregate"]
        for s in [*common(tmp_path, target, "aggregator"), "api.enabled=true", "api.port=0"]:
            args += ["--set", s]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **env})

    def api_url(self) -> str:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            for e in json_records(self.log.read_text(errors="replace")):
                if e.get("event") == "API listening":
                    return str(e["url"])
            time.sleep(0.1)
        raise AssertionError(self.log.read_text()[-3000:])

    def published(self) -> list[int]:
        return [int(m.group(1)) for e in json_records(self.log.read_text(errors="replace"))
                if (m := re.match(r"GLOBAL ROUND (\d+) PUBLISHED", str(e.get("event", ""))))]

    def wait_round(self, n: int, timeout: float = 240) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if n in self.published():
                return
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.2)
        raise AssertionError(f"no round {n}:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(60)


def loaded(miner) -> list[int]:  # type: ignore[no-untyped-def]
    return [int(m.group(1)) for e in miner.events()
            if (m := re.match(r"GLOBAL ROUND (\d+) LOADED", str(e.get("event", ""))))]


def exercise(tmp_path: Path, target: str, miner_factory, env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    agg = Aggregator(tmp_path, target, env)
    miners = [miner_factory(tmp_path / name, [*common(tmp_path, target, name), f"train.seed={seed}"], env=env)
              for name, seed in (("m1", 1), ("m2", 2))]
    try:
        agg.wait_round(2)
        url = agg.api_url()
        code, status = get_json(url + "/status")
        assert code == 200 and status["aggregator"]["round"] >= 2, status
        assert status["aggregator"]["verdicts"]["accepted"] >= 4
        metrics = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
        assert "minerd_aggregator_round " in metrics
        assert 'minerd_aggregator_submissions_total{reason="accepted"}' in metrics
        assert agg.stop(signal.SIGKILL) == -signal.SIGKILL  # mid-round: round 2 is open
        again = Aggregator(tmp_path, target, env)
        again.wait_round(4)
        assert again.stop() == 0
        text = again.log.read_text()
        assert "EXCHANGE: round 2 is open" in text or "EXCHANGE: round 3 is open" in text, text[-2000:]
        for m in miners:
            rounds = loaded(m)
            # Each global round loaded once, in order: the restarted aggregator published none twice.
            assert rounds[:5] == [0, 1, 2, 3, 4][: len(rounds[:5])] and len(rounds) >= 4, rounds
            assert m.proc.poll() is None
    finally:
        for m in miners:
            m.kill()
        agg.stop(signal.SIGKILL)


def test_on_a_directory(tmp_path: Path, miner_factory) -> None:  # type: ignore[no-untyped-def]
    exercise(tmp_path, str(tmp_path / "target"), miner_factory, {})
    scores = json.loads((tmp_path / "target" / "rounds" / "1" / "scores.json").read_text())
    assert {m: s["accepted"] for m, s in scores["submissions"].items()} == {"m1": True, "m2": True}
    assert scores["held_out_loss_after"] < scores["held_out_loss_before"]


def test_on_s3(tmp_path: Path, miner_factory, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    srv = MotoServer(tmp_path / "moto.log")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": srv.url}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    srv.start()
    try:
        exercise(tmp_path, f"s3://{BUCKET}/exchange", miner_factory, env)
    finally:
        srv.stop()
