"""`minerd bundle` gathers the six items a support request needs (diagnostics, recent step lines,
warnings and errors, upload history, the config with secrets masked, versions) into one file,
without secrets.

One real miner (small config, uploads on) runs while the bundle is taken, so the bundle reads
its log, its upload target and its live /diagnostics; a second case reads pm2's default log
path from a PM2_HOME of our own, with a broken config and no miner at all.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.bundle import SECTIONS
from tests.conftest import ROOT, MinerProcess, small_sets

TOKEN = "tok-7f3a9c1e5b2d8f4a6c0e"  # a test token that must never appear in a bundle
AWS_SECRET = "aws-secret-Zq81xVb27Lm"


def run_bundle(
    out: Path, *args: str, pm2_home: Path, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PM2_HOME": str(pm2_home), **(extra_env or {})}
    for key in [k for k in env if k.startswith("MINERD_")]:
        if key not in (extra_env or {}):
            env.pop(key)
    return subprocess.run(
        [sys.executable, "-m", "daemon", "bundle", "--out", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def sections(text: str) -> dict[str, str]:
    """Body of each `## ` section, by title."""
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


@dataclass
class Taken:
    proc: subprocess.CompletedProcess[str]
    text: str
    out: Path
    state_dir: Path
    miner_log: str
    miner_exit: int


@pytest.fixture(scope="module")
def taken(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Taken]:
    base = tmp_path_factory.mktemp("bundle")
    state_dir = base / "state"
    miner = MinerProcess(
        state_dir,
        small_sets(
            state_dir,
            "api.port=0",
            f"api.token={TOKEN}",
            "upload.enabled=true",
            "upload.min_inner_step=3",
            "upload.every_inner_steps=2",
        ),
    )
    try:
        miner.wait_for("UPLOAD OK", timeout=120)
        miner.wait_for("checkpoint saved", timeout=60)
        url = miner.api_url()
        # A decoy: the token as it could end up in a log by accident (a proxy echoing a header).
        decoy = base / "decoy.log"
        decoy.write_text(f'2026-01-01 00:00:00.000 +00:00: curl -H "Authorization: Bearer {TOKEN}" error: 401\n')
        out = base / "out" / "bundle.md"
        proc = run_bundle(
            out,
            "--log",
            str(miner.log_path),
            "--log",
            str(decoy),
            "--url",
            url,
            "--set",
            f"paths.state_dir={state_dir}",
            "--set",
            f"api.token={TOKEN}",
            pm2_home=base / "no-pm2",
            extra_env={"AWS_SECRET_ACCESS_KEY": AWS_SECRET},
        )
        miner.signal(signal.SIGINT)
        code = miner.wait(60)
        yield Taken(proc, out.read_text() if out.exists() else "", out, state_dir, miner.text(), code)
    finally:
        miner.kill()


@pytest.mark.integration
class TestBundleOfRunningMiner:
    """A bundle taken while a real miner trains and uploads holds the six items and no secret."""

    def test_exit_zero_and_one_file_written_atomically(self, taken: Taken) -> None:
        assert taken.proc.returncode == 0, taken.proc.stderr
        assert taken.out.is_file()
        assert [p.name for p in taken.out.parent.iterdir()] == ["bundle.md"]  # no temp file left
        assert f"wrote {taken.out}" in taken.proc.stdout
        assert taken.miner_exit == 0, taken.miner_log[-2000:]

    def test_six_sections_in_order(self, taken: Taken) -> None:
        titles = re.findall(r"^## (.+)$", taken.text, flags=re.MULTILINE)
        assert titles == list(SECTIONS)

    def test_diagnostics_local_logged_and_live(self, taken: Taken) -> None:
        body = sections(taken.text)[SECTIONS[0]]
        assert body.count("GPU DIAGNOSTICS") >= 2  # this machine's block and the one the miner logged
        assert "Gradient accumulation steps: 2" in body  # the logged block: the miner's 64/128 config
        assert '"micro_batches_per_inner_step": 2' in body  # live /diagnostics JSON
        assert "CUDA: " in body and "nvidia-smi" in body

    def test_last_step_lines(self, taken: Taken) -> None:
        body = sections(taken.text)[SECTIONS[1]]
        steps = re.findall(r"Outer Step: \d+ \| Inner Step: \d+ \| LR: ", body)
        assert 1 <= len(steps) <= 20
        assert '"global_step"' in body  # the live /status progress fields

    def test_warnings_and_errors(self, taken: Taken) -> None:
        body = sections(taken.text)[SECTIONS[2]]
        assert "no GPU in use: training on the CPU" in body
        assert "UPLOAD BLOCKED" in body  # min_inner_step=3 blocks the first steps of each outer step

    def test_upload_history(self, taken: Taken) -> None:
        body = sections(taken.text)[SECTIONS[3]]
        uploads = taken.state_dir / "uploads"
        # The miner kept training (and pruning old revisions) after the bundle was taken: the bundle's
        # LATEST is a published revision no newer than the target's LATEST after the stop.
        m = re.search(r"LATEST = rev-(\d+)-(\d+)", body)
        assert m, body[:2000]
        name = f"rev-{m.group(1)}-{m.group(2)}"
        final = (uploads / "LATEST").read_text().strip().split("-")
        assert (int(m.group(1)), int(m.group(2))) <= (int(final[1]), int(final[2]))
        assert f"{name}/metadata.json" in body and f'"revision": "{name}"' in body and '"sha256"' in body
        assert f"| {name} (LATEST) |" in body
        assert "UPLOAD OK" in body

    def test_config_masked(self, taken: Taken) -> None:
        body = sections(taken.text)[SECTIONS[4]]
        assert "token: '********'" in body
        assert f"state_dir: {taken.state_dir}" in body

    def test_versions(self, taken: Taken) -> None:
        body = sections(taken.text)[SECTIONS[5]]
        for name in (
            "| minerd |",
            "| Python |",
            "| torch |",
            "| CUDA (torch built with) |",
            "| faiss |",
            "| platform |",
        ):
            assert name in body

    def test_no_secret_anywhere(self, taken: Taken) -> None:
        assert TOKEN not in taken.text
        assert AWS_SECRET not in taken.text
        assert "Bearer ********" in taken.text  # the decoy line was read, and scrubbed


@pytest.mark.integration
class TestBundleFromPm2Logs:
    """With no --log and no miner, the bundle reads pm2's default log files, and a broken config
    still gives a bundle (exit 0) that lists the config problems."""

    def test_pm2_default_paths_broken_config(self, tmp_path: Path) -> None:
        home = tmp_path / "pm2home"
        (home / "logs").mkdir(parents=True)
        p = "2026-11-22 04:47:0{s}.000 +00:00: "
        lines = [
            p.format(s=1) + '{"event": "GPU DIAGNOSTICS", "level": "info", "logger": "minerd"}',
            p.format(s=1) + '{"event": "CUDA available: True", "level": "info", "logger": "minerd"}',
            p.format(s=2) + '{"event": "Outer Step: 3 | Inner Step: 7 | LR: 0.00010000 | Loss: 3.40 | Step Time: '
            '15.2s | GPU Mem: 18.45GB", "level": "info", "logger": "minerd.train"}',
            p.format(s=3) + '{"event": "SLOW STEP: 245.7s (expected 10-30s) - Check GPU usage!", '
            '"level": "warning", "logger": "minerd.train"}',
            p.format(s=4) + "Traceback (most recent call last):",
            p.format(s=4) + '  File "x.py", line 1, in <module>',
            p.format(s=4) + "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
            p.format(s=5) + f'{{"event": "request", "headers": "Authorization: Bearer {TOKEN}", "level": "info"}}',
        ]
        (home / "logs" / "distributed-training-miner-error.log").write_text("\n".join(lines) + "\n")
        (home / "logs" / "distributed-training-miner-out.log").write_text("")
        out = tmp_path / "b.md"
        proc = run_bundle(
            out,
            "--set",
            "train.batch_size=0",
            "--set",
            f"paths.state_dir={tmp_path / 'none'}",
            pm2_home=home,
            extra_env={"MINERD_API__TOKEN": TOKEN, "MINERD_API__PORT": "0"},
        )
        assert proc.returncode == 0, proc.stderr
        text = out.read_text()
        assert f"{home / 'logs' / 'distributed-training-miner-error.log'} (8 lines read)" in text
        parts = sections(text)
        assert "CUDA available: True" in parts[SECTIONS[0]]
        assert "Outer Step: 3 | Inner Step: 7" in parts[SECTIONS[1]]
        problems = parts[SECTIONS[2]]
        assert "SLOW STEP: 245.7s" in problems and "CUDA out of memory" in problems
        assert "Traceback (most recent call last)" in problems
        assert "does not exist" in parts[SECTIONS[3]]
        assert "config error: train.batch_size" in parts[SECTIONS[4]]
        assert TOKEN not in text


def test_render_keeps_one_line_per_record() -> None:
    from daemon.bundle import parse_line

    line = parse_line("x", '2026-11-22 04:47:00.100 +00:00: {"event": "a\\nb", "level": "error", "k": 1}')
    assert line.time == "2026-11-22 04:47:00.100000"
    assert "\n" not in line.render() and "[error] a" in line.render() and "k=1" in line.render()


class TestRedaction:
    """Every secret-looking value in the gathered text is masked; look-alike words are not."""

    @pytest.mark.parametrize(
        ("text", "secret"),
        [
            ("MINIO_SECRET_KEY=minio-s3cret-1", "minio-s3cret-1"),
            ("R2_SECRET_KEY: r2-s3cret-2", "r2-s3cret-2"),
            ("private_key: pk-s3cret-3", "pk-s3cret-3"),
            ("credentials=cred-s3cret-4", "cred-s3cret-4"),
            ("auth=auth-s3cret-5", "auth-s3cret-5"),
            ("Cookie: session=sess-s3cret-6", "sess-s3cret-6"),
            ("endpoint https://user:tok-s3cret-7@minio.local:9000/bucket", "tok-s3cret-7"),
            ("endpoint https://user:pa/ss-s3cret-8@minio.local", "ss-s3cret-8"),
            ("endpoint https://user:p@ss-s3cret-9@minio.local", "ss-s3cret-9"),
            ("git https://ghp-s3cret-10@github.com/x", "ghp-s3cret-10"),
            ('{"api_key": "k-s3cret-11"}', "k-s3cret-11"),
        ],
    )
    def test_masked(self, text: str, secret: str) -> None:
        from daemon.bundle.redact import scrub

        out = scrub(text, [])
        assert secret not in out and "********" in out, out

    def test_look_alikes_stay(self) -> None:
        from daemon.bundle.redact import scrub

        text = "author=Jane secretary=Bob password: null tokens_per_s=1950.2"
        assert scrub(text, []) == text
