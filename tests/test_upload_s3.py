"""The s3 backend against a real S3-compatible server (moto) on loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from daemon.config import UploadConfig
from daemon.storage import S3Storage, StorageError
from daemon.upload import Uploader, verify_target
from daemon.upload.revision import read_pointer, verify
from tests.conftest import BUCKET, MotoServer

pytestmark = pytest.mark.integration

TARGET = f"s3://{BUCKET}/runs/a"


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    srv = MotoServer(tmp_path / "moto.log")
    srv.start()
    yield srv
    srv.stop()


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = torch.nn.Linear(256, 256)
    return m, torch.optim.AdamW(m.parameters(), lr=1e-3)


def _cfg(server: MotoServer, **kw: object) -> UploadConfig:
    base = {
        "backend": "s3",
        "target": TARGET,
        "endpoint_url": server.url,
        "min_inner_step": 0,
        "every_inner_steps": 1,
        "keep": 2,
        "min_interval_seconds": 0,
    }
    return UploadConfig.model_validate(base | kw)


class TestS3Publish:
    """Revisions land whole in the bucket, verify passes, K are kept."""

    def test_publish_verify_keep(self, server: MotoServer, tmp_path: Path) -> None:
        reg = CollectorRegistry()
        up = Uploader.from_config(_cfg(server), tmp_path, reg, config_hash="h")
        up.start()
        m, opt = _model()
        try:
            for step in range(1, 5):
                assert up.on_inner_step(0, step, 0.25, m, opt).allowed
                assert up.wait_idle(30)
        finally:
            assert up.stop(10)
        storage = S3Storage(TARGET, server.url)
        assert read_pointer(storage) == "rev-0-4"
        assert sorted(storage.list_revisions()) == ["rev-0-3", "rev-0-4"]
        assert verify_target(TARGET, server.url) == []
        assert reg.get_sample_value("minerd_upload_attempts_total", {"result": "ok"}) == 4
        # Corrupt one object: verify names it.
        storage.put_bytes("rev-0-4/optimizer.pt", b"not the optimizer")
        problems = verify_target(TARGET, server.url)
        # One line: a file of the wrong size cannot have the right checksum either.
        assert len(problems) == 1 and "rev-0-4/optimizer.pt: size" in problems[0], problems

    def test_credentials_from_environment_only(
        self, server: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        with pytest.raises(StorageError, match="AWS_SECRET_ACCESS_KEY"):
            Uploader.from_config(_cfg(server), tmp_path, CollectorRegistry())


class _KillMidRevision(S3Storage):
    """The real S3 backend; the server is killed right after the first file of
    the second revision is stored, so that revision is half-uploaded then."""

    def __init__(self, server: MotoServer, down_seconds: float) -> None:
        super().__init__(TARGET, server.url)
        self.server, self.down = server, down_seconds
        self.first: str | None = None
        self.victim: str | None = None
        self.restarted = threading.Event()

    def put_file(self, key: str, src: Path) -> None:
        super().put_file(key, src)
        rev = key.split("/")[0]
        if self.first is None:
            self.first = rev
        elif self.victim is None and rev != self.first:
            self.victim = rev
            self.server.stop()
            threading.Thread(target=self._restart, daemon=True).start()

    def _restart(self) -> None:
        time.sleep(self.down)
        self.server.start()
        self.restarted.set()


class TestServerRestart:
    """Server killed mid-revision: training goes on, retries happen, the next
    allowed revision is published whole, and no reader ever sees a partial one."""

    def test_stop_mid_upload(self, server: MotoServer, tmp_path: Path) -> None:
        reg = CollectorRegistry()
        storage = _KillMidRevision(server, down_seconds=1.5)
        up = Uploader(_cfg(server, retries=2, keep=3), storage, tmp_path / "staging", reg, backoff_base=0.2)
        # 1. A reader polls LATEST and verifies whatever it names.
        partial: list[str] = []
        checks = [0]
        done = threading.Event()

        def reader() -> None:
            rs = S3Storage(TARGET, server.url)
            while not done.is_set():
                try:
                    before = read_pointer(rs)
                except StorageError:
                    continue  # server down: nothing to see, nothing partial
                if before is None:
                    continue
                problems = [p for p in verify(rs) if ": unreadable:" not in p]
                checks[0] += 1
                try:
                    after = read_pointer(rs)
                except StorageError:
                    continue
                # A revision pruned while we read it is a race, not a partial one.
                if problems and after == before:
                    partial.extend(problems)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        up.start()
        m, opt = _model()
        step_costs = []
        try:
            # 2. Train: one inner step every 20 ms, the gate asked each time.
            with capture_logs() as logs:
                step = 0
                deadline = time.monotonic() + 40
                while time.monotonic() < deadline:
                    step += 1
                    t0 = time.perf_counter()
                    up.on_inner_step(0, step, 0.5, m, opt)
                    step_costs.append(time.perf_counter() - t0)
                    time.sleep(0.02)
                    st = up.status()
                    if storage.restarted.is_set() and st["uploads"] >= 5:
                        last_step = step
                        break
                else:
                    pytest.fail(f"no revision published after the restart: {up.status()}")
                assert up.wait_idle(30)
        finally:
            assert up.stop(10)
            done.set()
            t.join(10)
        # 3. Retries happened; the victim was never the newest whole revision.
        events = [e["event"] for e in logs]
        victim = storage.victim
        assert victim is not None
        assert any(e.startswith(f"UPLOAD RETRY: {victim} attempt 1/3") for e in events)
        ok = [e for e in events if e.startswith("UPLOAD OK")]
        assert ok[0].startswith("UPLOAD OK: rev-0-1 ") and len(ok) >= 2
        latest = read_pointer(S3Storage(TARGET, server.url))
        assert latest is not None and int(latest.rsplit("-", 1)[1]) >= int(victim.rsplit("-", 1)[1])
        assert int(latest.rsplit("-", 1)[1]) <= last_step
        assert verify_target(TARGET, server.url) == []
        # 4. Nobody saw half a revision; training never waited for storage.
        assert partial == []
        assert checks[0] >= 3
        assert max(step_costs) < 0.5, max(step_costs)
        assert reg.get_sample_value("minerd_upload_attempts_total", {"result": "ok"}) >= 2
        print(
            f"victim {victim}, latest {latest}, failed",
            reg.get_sample_value("minerd_upload_attempts_total", {"result": "failed"}),
            "reader checks",
            checks[0],
        )
