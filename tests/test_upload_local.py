"""The local backend: whole revisions, keep K, verify, restart, and SIGKILL mid-publish."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file

from daemon.config import UploadConfig
from daemon.storage import LocalStorage, StorageError
from daemon.upload import Uploader, verify_target

ROOT = Path(__file__).resolve().parents[1]


def _train_step(m: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    m(torch.randn(4, m.in_features)).square().mean().backward()  # type: ignore[operator]
    opt.step()


def _model(width: int = 16) -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = torch.nn.Linear(width, width)
    return m, torch.optim.AdamW(m.parameters(), lr=0.01)


def _cfg(**kw: object) -> UploadConfig:
    base = {"min_inner_step": 0, "every_inner_steps": 1, "keep": 2, "min_interval_seconds": 0}
    return UploadConfig.model_validate(base | kw)


class TestPublish:
    """Allowed steps become whole revisions; LATEST names the newest; K are kept."""

    def test_publish_keep_and_snapshot_time(self, tmp_path: Path) -> None:
        reg = CollectorRegistry()
        up = Uploader.from_config(_cfg(), tmp_path, reg, version="9.9", config_hash="abc")
        up.start()
        m, opt = _model()
        try:
            for step in range(1, 6):
                _train_step(m, opt)
                expected = {k: v.clone() for k, v in m.state_dict().items()}
                assert up.on_inner_step(0, step, 0.5, m, opt).allowed
                # Training goes on at once; the revision must hold the state as of the call.
                _train_step(m, opt)
                assert up.wait_idle(30)
        finally:
            assert up.stop(10)
        target = tmp_path / "uploads"
        assert (target / "LATEST").read_text().strip() == "rev-0-5"
        assert sorted(p.name for p in target.glob("rev-*")) == ["rev-0-4", "rev-0-5"]
        assert verify_target(str(target)) == []
        saved = load_file(target / "rev-0-5" / "model.safetensors")
        for k, v in expected.items():
            assert torch.equal(saved[k], v)
        meta = json.loads((target / "rev-0-5" / "metadata.json").read_text())
        assert (meta["outer_step"], meta["inner_step"], meta["loss"]) == (0, 5, 0.5)
        assert meta["minerd_version"] == "9.9" and meta["config_hash"] == "abc"
        assert set(meta["files"]) == {"model.safetensors", "optimizer.pt"}
        assert meta["files"]["optimizer.pt"]["size"] == (target / "rev-0-5" / "optimizer.pt").stat().st_size
        optim = torch.load(target / "rev-0-5" / "optimizer.pt", weights_only=True)
        assert set(optim) == {"state", "param_groups"}
        assert reg.get_sample_value("minerd_upload_attempts_total", {"result": "ok"}) == 5
        assert reg.get_sample_value("minerd_upload_bytes_total") == 5 * sum(e["size"] for e in meta["files"].values())
        assert up.status()["last_revision"] == "rev-0-5"

    def test_restart_reads_latest(self, tmp_path: Path) -> None:
        """After a restart the gate knows the last revision and the age is honest."""
        m, opt = _model()
        first = Uploader.from_config(_cfg(), tmp_path, CollectorRegistry())
        first.start()
        first.on_inner_step(1, 7, 0.5, m, opt)
        assert first.wait_idle(30) and first.stop(10)
        later = time.time() + 100
        again = Uploader.from_config(_cfg(), tmp_path, CollectorRegistry(), clock=lambda: later)
        again.start()
        try:
            assert again.status()["last_revision"] == "rev-1-7"
            assert again.status()["age_seconds"] == pytest.approx(100, abs=5)
            assert again.on_inner_step(1, 7, 0.5, m, opt).reason == "not_newer"
            assert again.on_inner_step(0, 9, 0.5, m, opt).reason == "not_newer"
            assert again.on_inner_step(1, 8, 0.5, m, opt).allowed
        finally:
            assert again.stop(10)


class _FailingManifest(LocalStorage):
    """A real directory whose manifest writes fail for chosen revisions."""

    def __init__(self, root: Path, failing: set[str]) -> None:
        super().__init__(root)
        self.failing = failing

    def put_bytes(self, key: str, data: bytes) -> None:
        if key.split("/")[0] in self.failing:
            raise StorageError(f"injected failure writing {key}")
        super().put_bytes(key, data)


class TestFailure:
    """A revision that cannot be stored is retried, then dropped; LATEST stays whole."""

    def test_dropped_then_next_published(self, tmp_path: Path) -> None:
        reg = CollectorRegistry()
        target = tmp_path / "t"
        storage = _FailingManifest(target, {"rev-0-2"})
        up = Uploader(_cfg(retries=2), storage, target / ".staging", reg, backoff_base=0.01)
        up.start()
        m, opt = _model()
        try:
            for step in (1, 2, 3):
                assert up.on_inner_step(0, step, 0.5, m, opt).allowed
                assert up.wait_idle(30)
                if step == 2:
                    assert (target / "LATEST").read_text().strip() == "rev-0-1"
                    assert verify_target(str(target)) == []
        finally:
            assert up.stop(10)
        assert (target / "LATEST").read_text().strip() == "rev-0-3"
        assert verify_target(str(target)) == []
        assert reg.get_sample_value("minerd_upload_attempts_total", {"result": "failed"}) == 1
        assert reg.get_sample_value("minerd_upload_attempts_total", {"result": "ok"}) == 2
        assert up.status()["failures"] == 1


class TestVerify:
    """verify_target finds what a validator would reject, one line per problem."""

    def _published(self, tmp_path: Path) -> Path:
        m, opt = _model()
        up = Uploader.from_config(_cfg(), tmp_path, CollectorRegistry())
        up.start()
        up.on_inner_step(0, 3, 0.5, m, opt)
        assert up.wait_idle(30) and up.stop(10)
        return tmp_path / "uploads"

    def test_problems(self, tmp_path: Path) -> None:
        assert verify_target(str(tmp_path / "nothing")) == [f"{tmp_path / 'nothing'}: LATEST: missing"]
        target = self._published(tmp_path)
        model = target / "rev-0-3" / "model.safetensors"
        data = bytearray(model.read_bytes())
        data[-1] ^= 0xFF
        model.write_bytes(bytes(data))
        (target / "rev-0-3" / "optimizer.pt").unlink()
        problems = verify_target(str(target))
        assert len(problems) == 2
        assert "model.safetensors: sha256" in problems[1] or "model.safetensors: sha256" in problems[0]
        assert any(p.endswith("optimizer.pt: missing") for p in problems)
        (target / "LATEST").write_text("garbage\n")
        assert "does not name a revision" in verify_target(str(target))[0]

    def _rewrite_manifest(self, rev: Path, change: Callable[[dict], None]) -> None:
        manifest = json.loads((rev / "metadata.json").read_text())
        change(manifest)
        (rev / "metadata.json").write_text(json.dumps(manifest))

    def test_a_manifest_naming_a_path_outside_the_revision(self, tmp_path: Path) -> None:
        target = self._published(tmp_path)
        outside = tmp_path / "outside.txt"
        outside.write_text("not part of any revision\n")
        data = outside.read_bytes()
        entry = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self._rewrite_manifest(target / "rev-0-3", lambda m: m["files"].update({"../../outside.txt": entry}))
        (problem,) = verify_target(str(target))
        assert problem.endswith("names a file outside the revision ('../../outside.txt')")

    def test_a_model_that_is_not_safetensors(self, tmp_path: Path) -> None:
        target = self._published(tmp_path)
        rev = target / "rev-0-3"
        data = b"this is a pickle, not safetensors" * 10
        (rev / "model.safetensors").write_bytes(data)
        entry = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self._rewrite_manifest(rev, lambda m: m["files"].update({"model.safetensors": entry}))
        (problem,) = verify_target(str(target))
        assert "model.safetensors: not a safetensors file" in problem

    def test_revision_names_take_ascii_digits_only(self, tmp_path: Path) -> None:
        target = self._published(tmp_path)
        (target / "rev-0-3").rename(target / "rev-0-\u0663")  # ARABIC-INDIC DIGIT THREE
        (target / "LATEST").write_text("rev-0-\u0663\n")
        (problem,) = verify_target(str(target))
        assert "does not name a revision" in problem

    @pytest.mark.parametrize("what", ["LATEST", "file"])
    def test_a_directory_where_a_file_belongs_is_one_line(self, tmp_path: Path, what: str) -> None:
        target = self._published(tmp_path)
        victim = target / "LATEST" if what == "LATEST" else target / "rev-0-3" / "optimizer.pt"
        victim.unlink()
        victim.mkdir()
        (problem,) = verify_target(str(target))
        assert "unreadable" in problem and "Is a directory" in problem


class TestStaging:
    """The publisher's staging folder is its own: a symbolic link there is replaced, never followed."""

    def test_a_symlinked_staging_folder_is_not_followed(self, tmp_path: Path) -> None:
        victim = tmp_path / "victim"
        victim.mkdir()
        (victim / "precious.txt").write_text("keep me\n")
        (victim / "rev-0-3").mkdir()
        (victim / "rev-0-3" / "also-precious.txt").write_text("keep me too\n")
        staging = tmp_path / "uploads" / ".staging"
        staging.parent.mkdir()
        staging.symlink_to(victim, target_is_directory=True)
        m, opt = _model()
        up = Uploader.from_config(_cfg(), tmp_path, CollectorRegistry())
        up.start()
        assert not staging.is_symlink()
        up.on_inner_step(0, 3, 0.5, m, opt)
        assert up.wait_idle(30) and up.stop(10)
        assert sorted(p.name for p in victim.rglob("*")) == ["also-precious.txt", "precious.txt", "rev-0-3"]
        assert verify_target(str(tmp_path / "uploads")) == []


CHILD = textwrap.dedent(
    """
    import sys
    import torch
    from prometheus_client import CollectorRegistry
    from daemon.config import UploadConfig
    from daemon.upload import Uploader

    torch.set_num_threads(1)
    cfg = UploadConfig(min_inner_step=0, every_inner_steps=1, keep=2, min_interval_seconds=0)
    up = Uploader.from_config(cfg, sys.argv[1], CollectorRegistry())
    up.start()
    model = torch.nn.Linear(2048, 2048)  # 16 MB of weights, 32 MB of Adam state
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 2048)).sum().backward()
    opt.step()
    step = 0
    while True:  # publish back to back until killed
        step += 1
        with torch.no_grad():
            model.weight.add_(1e-3)
        up.on_inner_step(0, step, 0.5, model, opt)
        up.wait_idle(60)
        if step == 1:
            print("FIRST", flush=True)
    """
)


@pytest.mark.integration
class TestSigkill:
    """SIGKILL in the middle of a revision leaves LATEST naming a whole one."""

    def test_kill_mid_revision(self, tmp_path: Path) -> None:
        state = tmp_path / "state"
        target = state / "uploads"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        # 1. A publisher that writes 48 MB revisions back to back.
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(state)], stdout=subprocess.PIPE, env=env, cwd=ROOT)
        try:
            assert child.stdout is not None
            # structlog's default renderer shares stdout; skip its lines.
            while (line := child.stdout.readline()) and line.strip() != b"FIRST":
                pass
            assert line, "the publisher exited before its first revision"
            # 2. Wait until a file of a later revision is being written, then kill.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if any(p.stat().st_size > 0 for p in target.rglob(".*.tmp") if p.is_file()):
                    break
                time.sleep(0.002)
            else:
                pytest.fail("never caught the publisher writing")
            os.kill(child.pid, signal.SIGKILL)
            seen = sorted(str(p.relative_to(target)) for p in target.rglob(".*.tmp"))
        finally:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
        assert child.returncode == -signal.SIGKILL
        print("temp files at the kill:", seen)
        # 3. Whatever was half-written, a reader sees only a whole revision.
        latest = (target / "LATEST").read_text().strip()
        assert latest.startswith("rev-0-")
        assert verify_target(str(target)) == []
        # 4. After restart, the leftovers are cleared and publishing goes on.
        m, opt = _model()
        up = Uploader.from_config(_cfg(), state, CollectorRegistry())
        up.start()
        try:
            assert not (target / ".staging").exists()
            step = int(latest.rsplit("-", 1)[1]) + 1
            assert up.on_inner_step(0, step, 0.5, m, opt).allowed
            assert up.wait_idle(30)
        finally:
            assert up.stop(10)
        assert (target / "LATEST").read_text().strip() == f"rev-0-{step}"
        assert verify_target(str(target)) == []


CHILD_BETWEEN_FILES = textwrap.dedent(
    """
    import sys
    import time
    from pathlib import Path
    import torch
    from prometheus_client import CollectorRegistry
    from daemon.config import UploadConfig
    from daemon.upload import Uploader
    from daemon.storage import LocalStorage

    class Paused(LocalStorage):
        # Real files; after the weights of the second revision are in place,
        # it says so and waits to be killed.
        def put_file(self, key, src):
            super().put_file(key, src)
            if key == "rev-0-2/model.safetensors":
                print("STORED", flush=True)
                time.sleep(60)

    torch.set_num_threads(1)
    target = Path(sys.argv[1])
    cfg = UploadConfig(min_inner_step=0, every_inner_steps=1, keep=2, min_interval_seconds=0)
    up = Uploader(cfg, Paused(target), target / ".staging", CollectorRegistry())
    up.start()
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.Adam(model.parameters())
    for step in (1, 2):
        up.on_inner_step(0, step, 0.5, model, opt)
        up.wait_idle(60)
    """
)


@pytest.mark.integration
class TestSigkillBetweenFiles:
    """SIGKILL after a revision's weights are stored but before its manifest and
    LATEST: the half revision is on disk, and no reader is pointed at it."""

    def test_half_revision_invisible(self, tmp_path: Path) -> None:
        target = tmp_path / "uploads"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD_BETWEEN_FILES, str(target)],
            stdout=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        try:
            assert child.stdout is not None
            while (line := child.stdout.readline()) and line.strip() != b"STORED":
                pass
            assert line, "the publisher exited before storing the second revision"
            os.kill(child.pid, signal.SIGKILL)
        finally:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
        assert (target / "rev-0-2" / "model.safetensors").is_file()
        assert not (target / "rev-0-2" / "metadata.json").exists()
        assert (target / "LATEST").read_text().strip() == "rev-0-1"
        assert verify_target(str(target)) == []
        # Restarted, the same step publishes whole over the leftovers.
        m, opt = _model()
        up = Uploader.from_config(_cfg(target=str(target)), tmp_path, CollectorRegistry())
        up.start()
        try:
            assert up.on_inner_step(0, 2, 0.5, m, opt).allowed
            assert up.wait_idle(30)
        finally:
            assert up.stop(10)
        assert (target / "LATEST").read_text().strip() == "rev-0-2"
        assert verify_target(str(target)) == []
