"""The reliability suite: what a long-running miner must survive without losing a run.

Each scenario drives a real `minerd run` and checks what an operator would: the exit code,
the log lines, the metrics, what is on disk afterwards. docs/RELIABILITY.md lists every
scenario with what was observed. The disk-full scenarios need a small file system to fill:
a tmpfs mounted for the test as root (as CI runs), else a fault-injecting layer around
minerd's own writes (``tests/virtual_disk.py``); the start-up scenario runs on both.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.upload import verify_target
from tests.conftest import LM_CORPUS, MinerProcess, free_port, get_json, small_lm_sets, small_sets
from tests.virtual_disk import SmallDisk, small_disk

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def disk_kind() -> str:
    """The small disk the scenarios get: a tmpfs as root (as CI runs), the fault-injecting layer
    otherwise (``tests/virtual_disk.py``) or when ``MINERD_TEST_DISK=virtual`` asks for it."""
    return "tmpfs" if os.geteuid() == 0 and os.environ.get("MINERD_TEST_DISK") != "virtual" else "virtual"


def fill(disk: SmallDisk, leave: int) -> Path:
    """Grow a filler file until about ``leave`` bytes are free on ``disk``. Called again to top it
    up: the miner frees room too (old checkpoints pruned, temporary files removed after a
    refused write), and a disk that empties by itself would let the scenario pass by chance."""
    filler = disk.path / "filler.bin"
    if disk.kind == "virtual":  # sizes are what counts there: a sparse filler does
        with filler.open("ab") as fh:
            fh.truncate(fh.tell() + max(0, disk.free() - leave))
        return filler
    block = b"\0" * (1 << 20)
    with contextlib.suppress(OSError), filler.open("ab") as fh:
        while True:
            remaining = disk.free() - leave
            if remaining <= 0:
                break
            fh.write(block[:min(len(block), remaining)])
            fh.flush()
    return filler


def metric(url: str, name: str, **labels: str) -> float | None:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def wait_until(cond, timeout: float, what: str, m: MinerProcess) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        if m.proc.poll() is not None:
            raise AssertionError(f"miner exited ({m.proc.returncode}) before {what}:\n{m.text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{m.text()[-3000:]}")


@pytest.mark.slow
class TestDiskFull:
    """A full disk skips checkpoints and uploads with one DISK FULL line each, and training goes on."""

    def test_checkpoints_and_uploads_skip_then_resume(self, tmp_path: Path, miner_factory) -> None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with small_disk(tmp_path / "disk", 96, disk_kind()) as disk:
            state = disk.path / "state"
            sets = small_sets(state, f"api.port={port}", "checkpoint.every_inner_steps=3", "upload.enabled=true",
                              "upload.min_inner_step=3", "upload.every_inner_steps=3", "train.max_steps=100000")
            m = miner_factory(state, sets, disk.env, disk.module)
            ckpts = state / "checkpoints"
            wait_until(lambda: len(list(ckpts.glob("step-*"))) >= 2, 120, "two checkpoints", m)
            wait_until(lambda: (state / "uploads" / "LATEST").exists(), 60, "a first upload", m)
            # 1. The disk fills: checkpoints and uploads are refused, one DISK FULL line each.
            filler = fill(disk, leave=64 << 10)

            def refused(what: str, n: int) -> bool:
                fill(disk, leave=64 << 10)
                return sum(str(e.get("event", "")).startswith(f"DISK FULL: {what}") for e in m.events()) >= n

            wait_until(lambda: refused("checkpoint", 2), 120, "two refused checkpoints", m)
            wait_until(lambda: refused("upload revision", 1), 60, "a refused upload", m)
            step_before = get_json(f"{url}/status")[1]["global_step"]
            wait_until(lambda: get_json(f"{url}/status")[1]["global_step"] > step_before + 5, 60,
                       "training going on", m)
            line = next(e for e in m.events() if str(e.get("event", "")).startswith("DISK FULL: checkpoint"))
            # Free bytes are read after the refused write's temporary files are gone: a few MB at most.
            assert line["level"] == "error" and line["free_bytes"] < 8 << 20 and str(ckpts) in line["event"]
            assert (metric(url, "minerd_disk_full_total", what="checkpoint") or 0) >= 2
            fill(disk, leave=64 << 10)
            # Served, and small: a disk filled to exactly 0 bytes free reads 0 (`or` took 0 for absent).
            free = metric(url, "minerd_disk_free_bytes", path=str(state))
            assert free is not None and free < 8 << 20, free
            # 2. Nothing half-written: the newest revision verifies (temporary files: after the stop,
            # since a refused write may be under way at any moment).
            assert verify_target(str(state / "uploads")) == []  # what `minerd verify-upload` runs
            # 3. Room again: the next checkpoint is written without a restart.
            saved = len([e for e in m.events() if e.get("event") == "checkpoint saved"])
            filler.unlink()
            wait_until(lambda: len([e for e in m.events() if e.get("event") == "checkpoint saved"]) > saved, 60,
                       "a checkpoint once there is room", m)
            m.signal(2)
            assert m.wait(60) == 0, m.text()[-3000:]
            assert "unrecoverable error" not in m.text()
            assert not list(ckpts.glob(".tmp-*"))
            assert not [p for p in (state / "uploads").rglob("*") if p.name.endswith(".tmp")]

    @pytest.mark.parametrize("kind", ["tmpfs", "virtual"])
    def test_start_up_waits_for_room_not_ready(self, tmp_path: Path, miner_factory, kind: str) -> None:
        if kind == "tmpfs" and os.geteuid() != 0:
            if os.environ.get("MINERD_REQUIRE_TOOLS") or os.environ.get("CI"):
                pytest.fail("mounting a small tmpfs needs root; CI runs as root")
            pytest.skip("mounting a small tmpfs needs root (the virtual variant runs)")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with small_disk(tmp_path / "disk", 200, kind) as disk:
            state = disk.path / "state"
            filler = fill(disk, leave=16 << 20)  # under the 64 MB the start-up asks for
            # A generated corpus of 2 x 120k x 128 float32 (123 MB): more than the 64 MB asked for.
            m = miner_factory(state, small_sets(state, f"api.port={port}", "train.max_steps=100000",
                                                "twotower.num_docs=120000", "twotower.dim=128"), disk.env, disk.module)
            wait_until(lambda: "DISK FULL:" in m.text(), 90, "the DISK FULL line at start-up", m)
            code, body = get_json(f"{url}/readyz")
            assert code == 503 and body["reason"].startswith("disk full:"), body
            assert get_json(f"{url}/livez")[0] == 200  # waiting is not a stall
            # 1. Room enough to start building, not enough for the corpus: the write is refused,
            # and the miner waits again instead of exiting.
            with filler.open("r+b") as fh:
                fh.truncate(max(0, filler.stat().st_size - (56 << 20)))
            wait_until(lambda: "DISK FULL: start-up data" in m.text(), 90, "the refused corpus write", m)
            time.sleep(2)
            assert m.proc.poll() is None  # waiting, not exiting into a restart loop
            code, body = get_json(f"{url}/readyz")
            assert code == 503 and body["reason"].startswith("disk full:"), body
            assert not [p for p in state.rglob("*") if p.name.endswith(".tmp")]
            # 2. Room: it builds and becomes ready, no restart.
            filler.unlink()
            wait_until(lambda: get_json(f"{url}/readyz")[0] == 200, 120, "ready once there is room", m)
            assert m.text().count('"minerd starting"') == 1
            m.signal(2)
            assert m.wait(60) == 0, m.text()[-3000:]


def run_to_end(miner_factory, state: Path, sets: list[str], timeout: float = 120) -> MinerProcess:  # type: ignore[no-untyped-def]
    m = miner_factory(state, sets)
    m.wait(timeout)
    return m


def flip_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def one_line(m: MinerProcess, needle: str) -> dict:
    found = [e for e in m.events() if needle in str(e.get("event", ""))]
    assert len(found) == 1, m.text()[-3000:]
    return found[0]


class TestCorruption:
    """A broken file costs one line: the run goes on from what is intact, or stops with exit 2
    naming the file and what to do. Never exit 1, which a supervisor answers with a restart loop."""

    def _tt(self, state: Path, *extra: str) -> list[str]:
        return small_sets(state, "api.enabled=false", "checkpoint.every_inner_steps=5", *extra)

    # The training state and other manifest shapes: tests/test_checkpoint.py, without a process.
    @pytest.mark.parametrize("what", ["weights", "manifest"])
    def test_the_newest_checkpoint(self, tmp_path: Path, miner_factory, what: str) -> None:
        state = tmp_path / "state"
        assert run_to_end(miner_factory, state, self._tt(state, "train.max_steps=10")).proc.returncode == 0
        newest = state / "checkpoints" / "step-0000000010"
        if what == "weights":
            flip_byte(newest / "model.safetensors")
        elif what == "training state":
            flip_byte(newest / "train_state.safetensors")
        else:
            (newest / "manifest.json").write_text('{"files": {}, "global_step": 10}')
        m = run_to_end(miner_factory, state, self._tt(state, "train.max_steps=12"))
        assert m.proc.returncode == 0, m.text()[-3000:]
        line = one_line(m, "checkpoint corrupt, using the previous one")
        assert "step-0000000010" in line["event"] and line["level"] == "error"
        assert "(global step 5)" in m.text()

    def test_an_embedding_chunk(self, tmp_path: Path, miner_factory) -> None:
        state = tmp_path / "state"
        disk_mode = ("embeddings.storage_mode=disk", "embeddings.chunk_size=256", "embeddings.cache_l1_mb=0.01",
                     "embeddings.cache_l2_mb=0.01")
        assert run_to_end(miner_factory, state, self._tt(state, "train.max_steps=10", *disk_mode)).proc.returncode == 0
        chunks = list((state / "embeddings").glob("chunk-*.emb"))
        assert chunks
        for chunk in chunks:
            flip_byte(chunk)
        m = run_to_end(miner_factory, state, self._tt(state, "train.max_steps=40", *disk_mode))
        assert m.proc.returncode == 2, m.text()[-3000:]
        line = one_line(m, "corrupt state:")
        assert "embedding chunk" in line["event"] and "restore the state directory" in line["event"]
        assert "Traceback" not in m.text()

    def test_the_upload_pointer(self, tmp_path: Path, miner_factory) -> None:
        state = tmp_path / "state"
        up = ("upload.enabled=true", "upload.min_inner_step=2", "upload.every_inner_steps=2")
        assert run_to_end(miner_factory, state, self._tt(state, "train.max_steps=6", *up)).proc.returncode == 0
        (state / "uploads" / "LATEST").write_bytes(b"\x00garbage\xff\n")
        m = run_to_end(miner_factory, state, self._tt(state, "train.max_steps=10", *up))
        assert m.proc.returncode == 0, m.text()[-3000:]
        assert (state / "uploads" / "LATEST").read_text().strip() == "rev-1-2"  # step 9, the last on schedule
        assert verify_target(str(state / "uploads")) == []  # what `minerd verify-upload` runs

    def test_a_state_directory_that_is_a_file(self, tmp_path: Path, miner_factory) -> None:
        state = tmp_path / "state"
        state.write_text("not a directory\n")
        m = run_to_end(miner_factory, state, self._tt(state, "train.max_steps=3"))
        assert m.proc.returncode == 2
        lines = [x for x in m.text().splitlines() if x.strip()]
        assert lines == [f"config error: paths.state_dir: exists and is not a directory (got '{state}')"]

    def test_the_prepared_corpus_and_the_corpus(self, tmp_path: Path, miner_factory) -> None:
        corpus = tmp_path / "corpus"
        corpus.mkdir()
        for src in Path(LM_CORPUS[2]).glob("*.py"):  # json: 5 files, 48 KB
            (corpus / src.name).write_bytes(src.read_bytes())
        state = tmp_path / "state"
        sets = small_lm_sets(state, f"lm.corpus={corpus}", "lm.eval_fraction=0.2", "api.enabled=false",
                             "lm.seq_len=32", "train.batch_size=4", "train.effective_batch_size=4")
        assert run_to_end(miner_factory, state, [*sets, "train.max_steps=3"]).proc.returncode == 0
        # A flipped byte in a shard of the prepared corpus: caught by its checksum, prepared again.
        shard = state / "data" / "lm-dataset" / "train-000000.tokens"
        flip_byte(shard, at=1001)
        m = run_to_end(miner_factory, state, [*sets, "train.max_steps=6"])
        assert m.proc.returncode == 0, m.text()[-3000:]
        one_line(m, "the prepared corpus does not match its checksums")
        # A corpus file overwritten with binary junk: prepared again, the same tokenizer.
        victim = sorted(corpus.glob("*.py"))[0]
        victim.write_bytes(os.urandom(4096))
        m = run_to_end(miner_factory, state, [*sets, "train.max_steps=9"])
        assert m.proc.returncode == 0, m.text()[-3000:]
        assert "tokenizer reused" in m.text() and "preparing the corpus again" in m.text()
        index = json.loads((state / "data" / "lm-dataset" / "index.json").read_text())
        assert next(s for s in index["sources"] if s["key"] == str(victim))["size"] == 4096


@pytest.mark.slow
class TestKill9:
    """kill -9 at random points: every checkpoint and revision on disk stays whole, and a
    restart resumes having lost at most one checkpoint interval."""

    KILLS = 4

    def test_random_kills(self, tmp_path: Path, miner_factory) -> None:
        import random

        rng = random.Random(1234)
        state = tmp_path / "state"
        every = 3
        sets = small_sets(state, "api.enabled=false", f"checkpoint.every_inner_steps={every}", "upload.enabled=true",
                          "upload.min_inner_step=2", "upload.every_inner_steps=2", "train.max_steps=100000")
        last_seen = 0
        for kill in range(self.KILLS):
            m = miner_factory(state, sets)
            m.wait_for("Outer Step:", timeout=120)
            if kill:
                resumed = [e for e in m.events() if str(e.get("event", "")).startswith("Resumed from checkpoint")]
                assert resumed, m.text()[-3000:]
                step = int(str(resumed[0]["event"]).rsplit("global step ", 1)[1].rstrip(")"))
                # At most one checkpoint interval lost (a save can be under way when the kill lands).
                assert step >= last_seen - 2 * every, (step, last_seen)
            time.sleep(rng.uniform(0.2, 2.5))
            m.kill()
            steps = [e["global_step"] for e in m.events() if "Outer Step:" in str(e.get("event", ""))]
            last_seen = max(steps) if steps else last_seen
            # Every complete checkpoint verifies; no half-written one is visible.
            from daemon.checkpoint import CheckpointStore

            store = CheckpointStore(state / "checkpoints", keep=3)
            for ckpt in store.checkpoints():
                store.verify(ckpt)
            if (state / "uploads" / "LATEST").exists():
                # What `minerd verify-upload` runs, in this process (no interpreter start per kill).
                assert verify_target(str(state / "uploads")) == []


def step_times(m: MinerProcess) -> list[float]:
    import datetime

    out = []
    for e in m.events():
        if "Outer Step:" in str(e.get("event", "")):
            out.append(datetime.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp())
    return out


def steps_per_second(m: MinerProcess, t0: float, t1: float) -> float:
    return sum(t0 <= t <= t1 for t in step_times(m)) / (t1 - t0)


@pytest.mark.slow
class TestHttpFlood:
    """50 clients in a tight loop and 300 idle sockets on the monitoring port: training keeps at
    least 80% of its speed, /livez still answers, and the excess is slowed and refused."""

    def test_training_keeps_its_speed(self, tmp_path: Path, miner_factory) -> None:
        from tests.flood import flood

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        state = tmp_path / "state"
        # Two torch threads, as the default job uses both cores: the API has no spare core.
        m = miner_factory(state, small_lm_sets(state, f"api.port={port}", "train.torch_threads=2",
                                               "train.max_steps=100000", "lm.eval_every_steps=100000"))
        m.wait_for("Outer Step:", timeout=120)
        time.sleep(2)
        t0 = time.time()
        time.sleep(6)
        t1 = time.time()
        probes: list[tuple[int, float]] = []

        def probe() -> None:
            for _ in range(4):
                time.sleep(2)
                start = time.monotonic()
                probes.append((get_json(f"{url}/livez")[0], time.monotonic() - start))

        import threading

        prober = threading.Thread(target=probe)
        prober.start()
        result = flood(port, seconds=10, clients=50, idle=300)
        t2 = time.time()
        prober.join(30)
        time.sleep(6)
        t3 = time.time()
        idle = (steps_per_second(m, t0, t1) + steps_per_second(m, t2, t3)) / 2
        flooded = steps_per_second(m, t2 - 10, t2)
        assert result.idle_opened == 300 and result.requests > 0
        assert flooded >= 0.8 * idle, (flooded, idle, result.requests, result.refused)
        assert probes and all(code == 200 and seconds < 2.0 for code, seconds in probes), probes
        assert result.refused > 0  # the excess was turned away, not served
        m.signal(2)
        assert m.wait(60) == 0, m.text()[-3000:]
