"""verify-upload on forged uploads: each attack ends in one line, bounded memory and time, and
runs no code of the upload's.

Revisions are written by hand here, as a forger would: the hostile files, then a manifest
whose sizes and checksums agree with them, so that only the checks after the checksums can
catch them. The memory cases run ``minerd verify-upload`` in a child process under an
address-space limit and report its peak resident memory.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import math
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save

from daemon.compression import artifact
from daemon.config import ConfigError
from daemon.storage import S3Storage
from daemon.tasks.causal_lm.config import LmConfig
from daemon.upload import check_revision, verify_target
from daemon.upload.limits import LIMITS
from daemon.upload.verify import fetch_revision
from tests import test_upload_s3
from tests.conftest import ROOT, MotoServer, cli
from tests.test_upload_s3 import TARGET

REV = "rev-0-3"
server = test_upload_s3.server  # the moto fixture


def forge(target: Path, files: dict[str, bytes], name: str = REV) -> Path:
    """A revision of ``files`` with a manifest that agrees with them, named by LATEST."""
    rev = target / name
    rev.mkdir(parents=True, exist_ok=True)
    for fname, data in files.items():
        (rev / fname).write_bytes(data)
    (rev / "metadata.json").write_bytes(manifest(files, name))
    (target / "LATEST").write_text(name + "\n")
    return rev


def manifest(files: dict[str, bytes], name: str = REV) -> bytes:
    entries = {f: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for f, d in files.items()}
    return json.dumps({"format": 1, "revision": name, "outer_step": 0, "inner_step": 3, "loss": 0.5,
                       "created_at": "2026-01-01T00:00:00+00:00", "minerd_version": "0", "config_hash": "h",
                       "files": entries}).encode()


def tiny_hf_files() -> dict[str, bytes]:
    """The files minerd publishes for a language model, of a one-layer Llama (3,632
    parameters) and a word-level tokenizer: a revision that loads and runs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from daemon.tasks.causal_lm.export import HfLayout

    torch.manual_seed(0)
    words = ["[UNK]", "def", "add", "return", "the", "a", "b", "fox", "dog", "quick"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]")
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    files = dict(HfLayout.of(model, fast).files)
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    files["model.safetensors"] = save(weights, metadata={"format": "pt"})
    return files


@pytest.fixture(scope="module")
def hf_files() -> dict[str, bytes]:
    return tiny_hf_files()


def with_config(files: dict[str, bytes], **change: Any) -> dict[str, bytes]:
    config = json.loads(files["config.json"])
    config.update(change)
    return {**files, "config.json": json.dumps(config).encode()}


def sparse_artifact(nblocks: int, block: tuple[int, int], header_block: int) -> dict[str, bytes]:
    """A pseudo-gradient of one tensor that keeps one value per block, with the
    model_shapes.json that claims the shape it decodes to (nblocks x the block's values)."""
    bm, bn = block
    shape = [bm * nblocks, bn]
    tensors = {"w.indices": torch.zeros(nblocks, 1, dtype=torch.int16),
               "w.values": torch.ones(nblocks, 1, dtype=torch.int8),
               "w.scales": torch.full((nblocks,), 1e-3)}
    keep = 1 / (bm * bn)
    header = {"format": 1, "codec": "dct_topk", "block": header_block, "keep": keep, "quantize": True,
              "tensors": {"w": {"shape": shape, "layout": "blocks", "block": [bm, bn], "k": 1}}}
    return {artifact.TENSORS_FILE: save(tensors, metadata={"format": "pt"}),
            artifact.HEADER_FILE: json.dumps(header).encode(),
            "model_shapes.json": json.dumps({"w": shape}).encode()}


# The child reports its peak resident memory from VmHWM, the high-water mark of its own
# memory since exec: ru_maxrss would carry over the test process's own peak from the fork.
CHILD = """
import re, resource, sys, time
limit, report = int(sys.argv[1]), sys.argv[2]
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from daemon.cli import main
t0 = time.perf_counter()
try:
    main(sys.argv[3:])
finally:
    with open("/proc/self/status") as fh:
        peak_kb = re.search(r"VmHWM:\\s+(\\d+) kB", fh.read()).group(1)
    with open(report, "w") as fh:
        fh.write(f"{time.perf_counter() - t0} {peak_kb}")
"""
LIMIT_AS = 4 << 30  # importing torch and transformers maps about 0.7 GB of address space


def verify_in_child(target: Path, tmp_path: Path) -> tuple[int, list[str], float, float]:
    """``minerd verify-upload target`` in a child limited to LIMIT_AS of address space:
    (exit code, stderr lines, seconds verify took, peak resident MB)."""
    report = tmp_path / "report.txt"
    out = subprocess.run([sys.executable, "-c", CHILD, str(LIMIT_AS), str(report), "verify-upload", str(target)],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=240)
    assert "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]
    seconds, peak_kb = report.read_text().split()
    return out.returncode, out.stderr.splitlines(), float(seconds), int(peak_kb) / 1024


def _traced_peak(call: Any) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        return call(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# A child that imports torch and verifies a small revision peaks at about 250 MB resident
# (350 MB with transformers); the forged uploads below made it 1.1 to 16 GB.
BOUND_MB = 700
NOT_CUT = "tensor 'w': blocks [256, 256] keeping 1, but the codec cuts a 5120000x256 tensor into blocks of 160x128 " \
          "and keeps 1 of each"


@pytest.mark.integration
class TestArtifactDecodeSize:
    """A small pseudo-gradient cannot make the check allocate what it would decode to."""

    @pytest.mark.parametrize(("nblocks", "block", "header_block", "expected"), [
        (2000, 256, 256, "block 256 is not an integer in 2..181"),  # 14 KB: was 1.8 GB, and "ok"
        (20000, 256, 256, "block 256 is not an integer in 2..181"),  # 140 KB: a 5.2 GB allocation, a traceback
        (20000, 256, 181, NOT_CUT),  # a legal header, blocks encode never makes
        # 140 KB that decode to 655M values (2.6 GB) within the shapes they declare: legal, and
        # checked without decoding them (was a traceback).
        (20000, 181, 181, None),
    ], ids=["14KB", "140KB", "blocks-not-the-codecs", "legal-and-sparse"])
    def test_one_kept_value_per_block(
        self, tmp_path: Path, nblocks: int, block: int, header_block: int, expected: str | None
    ) -> None:
        target = tmp_path / "up"
        forge(target, sparse_artifact(nblocks, (block, block), header_block))
        code, lines, seconds, peak = verify_in_child(target, tmp_path)
        if expected is None:
            assert code == 0 and lines == [], lines
        else:
            assert code == 1 and lines == [f"{target}: {REV}/{artifact.TENSORS_FILE}: {expected}"]
        assert peak < BOUND_MB and seconds < 30, (peak, seconds)


class TestArtifactShapes:
    """The shapes an artifact may decode to come from the weights when they are there, and are
    capped when only the uploader's shape files say them."""

    def test_the_weights_header_bounds_each_tensor(self, tmp_path: Path) -> None:
        """model_shapes.json agrees with the artifact, but the weights say the real shape."""
        target = tmp_path / "up"
        weights = save({"w": torch.zeros(64, 64)}, metadata={"format": "pt"})
        forge(target, {**sparse_artifact(2000, (160, 128), 181), "model.safetensors": weights})
        assert verify_target(str(target)) == [
            f"{target}: {REV}/{artifact.TENSORS_FILE}: tensor 'w': shape [320000, 128] but the model's is [64, 64]"]

    def test_shapes_over_the_ceiling(self, tmp_path: Path) -> None:
        target = tmp_path / "up"
        files = sparse_artifact(2000, (160, 128), 181)
        files["model_shapes.json"] = json.dumps({"w": [320000, 128], "huge": [100_000, 30_000]}).encode()
        forge(target, files)
        assert verify_target(str(target)) == [
            f"{target}: {REV}/model_shapes.json: describes 3,040,960,000 parameters, over the "
            f"{LIMITS.params:,} a revision without its weights may describe"]
        forge(target, sparse_artifact(2000, (160, 128), 181))  # 41M parameters: within the default
        assert verify_target(str(target)) == []
        code, _, err = cli("verify-upload", str(target), "--max-params", "1000000")
        assert code == 1 and err.splitlines() == [
            f"{target}: {REV}/model_shapes.json: describes 40,960,000 parameters, over the 1,000,000 a revision "
            "without its weights may describe"]


class TestConfigSize:
    """A config.json is sized before a model is built from it, and must match the weights."""

    @pytest.mark.parametrize("weights", [True, False], ids=["with-weights", "pseudo-gradient-alone"])
    def test_twenty_thousand_layers(self, tmp_path: Path, hf_files: dict[str, bytes], weights: bool) -> None:
        """Built on the meta device this cost 30 s and 1.1 GB; through from_pretrained 160 s and 1.4 GB."""
        target = tmp_path / "up"
        files = with_config(hf_files, num_hidden_layers=20000)
        if not weights:
            del files["model.safetensors"]
            files.update(sparse_artifact(20, (160, 128), 181))
            del files["model_shapes.json"]
        forge(target, files)
        t0 = time.perf_counter()
        problems, peak = _traced_peak(lambda: verify_target(str(target)))
        assert problems == [f"{target}: {REV}/config.json: num_hidden_layers 20000 is over the 256 layers a model "
                            "may have here"]
        assert time.perf_counter() - t0 < 10 and peak < 50 << 20, peak

    @pytest.mark.parametrize(("change", "expected"), [
        ({}, None),
        ({"num_hidden_layers": 2}, "describes a model of 6,224 parameters, model.safetensors holds 3,632"),
        (" " * (LIMITS.config_bytes + 1), f"manifest size {LIMITS.config_bytes + 1} is over the "
                                          f"{LIMITS.config_bytes} bytes this file may take"),
    ], ids=["intact", "a-layer-more-than-the-weights", "over-its-cap"])
    def test_the_config_must_match_the_weights(
        self, tmp_path: Path, hf_files: dict[str, bytes], change: Any, expected: str | None
    ) -> None:
        files = with_config(hf_files, **change) if isinstance(change, dict) else {**hf_files, "config.json":
                                                                                 change.encode()}
        forge(tmp_path / "up", files)
        problems = verify_target(str(tmp_path / "up"))
        assert problems == ([f"{tmp_path / 'up'}: {REV}/config.json: {expected}"] if expected else [])

    @pytest.mark.integration
    def test_a_vocabulary_of_a_million(self, tmp_path: Path, hf_files: dict[str, bytes]) -> None:
        """vocab 1,000,000 x hidden 4096 beside one real tensor: from_pretrained initialised what
        the weights lack and tried to allocate 16 GB."""
        target = tmp_path / "up"
        files = with_config(hf_files, vocab_size=1_000_000, hidden_size=4096, intermediate_size=11008,
                            num_attention_heads=32, num_key_value_heads=32, head_dim=128)
        files["model.safetensors"] = save({"model.norm.weight": torch.ones(4096)}, metadata={"format": "pt"})
        forge(target, files)
        code, lines, seconds, peak = verify_in_child(target, tmp_path)
        assert code == 1
        assert lines == [f"{target}: {REV}/config.json: describes a model of 4,298,387,456 parameters, "
                         "model.safetensors holds 4,096"]
        assert peak < BOUND_MB and seconds < 60, (peak, seconds)


EVIL_CONFIG = {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                   "AutoModelForCausalLM": "evil.EvilModel"}}


def evil_code(marker: Path) -> bytes:
    return f"open({str(marker)!r}, 'w').write('ran')\n".encode()


@pytest.fixture
def answer_yes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Whoever asks on the terminal whether to run code is told yes (and recorded)."""
    asked: list[str] = []

    def yes(prompt: str = "") -> str:
        asked.append(prompt)
        return "y"

    monkeypatch.setattr(builtins, "input", yes)
    yield asked


class TestCustomCode:
    """Code shipped in an upload or a model directory never runs, and is refused in one line."""

    def test_auto_map_in_an_upload(self, tmp_path: Path, hf_files: dict[str, bytes], answer_yes: list[str]) -> None:
        target, marker = tmp_path / "up", tmp_path / "ran"
        rev = forge(target, with_config(hf_files, **EVIL_CONFIG))
        (rev / "evil.py").write_bytes(evil_code(marker))  # beside it, not in the manifest
        assert verify_target(str(target)) == [
            f"{target}: {REV}/config.json: names custom code (auto_map); code from an upload is never run"]
        assert not marker.exists() and answer_yes == []

    def test_python_files_in_an_upload(self, tmp_path: Path, hf_files: dict[str, bytes]) -> None:
        target = tmp_path / "up"
        forge(target, {**hf_files, "modeling_evil.py": evil_code(tmp_path / "ran")})
        assert verify_target(str(target)) == [
            f"{target}: {REV}/metadata.json: names a Python file ('modeling_evil.py'); code from an upload is "
            "never run"]

    def _model_dir(self, tmp_path: Path, hf_files: dict[str, bytes], **config: Any) -> Path:
        folder = tmp_path / "model"
        folder.mkdir()
        for name, data in with_config(hf_files, **config).items():
            (folder / name).write_bytes(data)
        return folder

    @pytest.mark.parametrize("what", ["auto_map", "python"])
    def test_config_validate_refuses_a_model_dir_with_code(
        self, tmp_path: Path, hf_files: dict[str, bytes], what: str
    ) -> None:
        folder = self._model_dir(tmp_path, hf_files, **(EVIL_CONFIG if what == "auto_map" else {}))
        if what == "python":
            (folder / "modeling_evil.py").write_bytes(evil_code(tmp_path / "ran"))
        code, out, err = cli("config", "validate", "--set", "train.task=causal_lm", "--set",
                             f"lm.init_from={folder}")
        why = ("config.json names the model's own Python code (auto_map); it is never run" if what == "auto_map"
               else "holds Python code (modeling_evil.py); a model's own code is never run")
        assert code == 2 and out == ""
        assert err.splitlines() == [f"config error: lm.init_from: {why} (got {str(folder)!r})"]

    def test_init_from_never_runs_the_code(
        self, tmp_path: Path, hf_files: dict[str, bytes], answer_yes: list[str]
    ) -> None:
        """Past the config check (a directory changed after it), loading still refuses it."""
        from daemon.tasks.causal_lm.model import build_model

        marker = tmp_path / "ran"
        folder = self._model_dir(tmp_path, hf_files, **EVIL_CONFIG)
        (folder / "evil.py").write_bytes(evil_code(marker))
        lm = LmConfig.model_validate({"init_from": str(folder)})
        with pytest.raises(ConfigError) as exc:
            build_model(lm, 64, None, torch.device("cpu"))
        (line,) = exc.value.problems
        assert line.startswith("config error: lm.init_from: cannot load the model:")
        assert not marker.exists() and answer_yes == []


class TestHostileFiles:
    """Every read is bounded before it happens; a JSON bomb is one line."""

    @pytest.mark.parametrize("depth", [100_000, 40])
    def test_deeply_nested_manifest(self, tmp_path: Path, hf_files: dict[str, bytes], depth: int) -> None:
        """100,000 levels raised RecursionError out of json (a 52-line traceback); 40 parse
        but are refused, before anything walks them."""
        target = tmp_path / "up"
        rev = forge(target, hf_files)
        (rev / "metadata.json").write_text("[" * depth + "]" * depth)
        code, out, err = cli("verify-upload", str(target))
        assert code == 1 and "Traceback" not in out + err
        assert err.splitlines() == [f"{target}: {REV}/metadata.json: nested deeper than 32 levels"]

    @pytest.mark.timeout(30)
    @pytest.mark.parametrize("case", ["LATEST-to-dev-zero", "weights-to-dev-zero", "revision-elsewhere", "LATEST-pipe",
                                      "LATEST-1TB", "tokenizer-1TB"])
    def test_reads_are_bounded_before_they_happen(self, tmp_path: Path, hf_files: dict[str, bytes], case: str) -> None:
        """A link to /dev/zero as LATEST read 2.3 GB before any check; a pipe blocks a read, a
        sparse 1 TB file takes hours to read. Nothing inside a target is followed."""
        target = tmp_path / "up"
        rev = forge(target, hf_files)
        expected = _plant(case, target, rev, tmp_path, len(hf_files["tokenizer.json"]))
        t0 = time.perf_counter()
        assert verify_target(str(target)) == [f"{target}: {expected}"]
        assert time.perf_counter() - t0 < 5


def _plant(case: str, target: Path, rev: Path, tmp_path: Path, tokenizer_bytes: int) -> str:
    """Make ``case`` of the revision; the line verify must give for it."""
    latest, weights, tokenizer = target / "LATEST", rev / "model.safetensors", rev / "tokenizer.json"
    if case in ("LATEST-to-dev-zero", "weights-to-dev-zero"):
        victim = latest if case.startswith("LATEST") else weights
        victim.unlink()
        victim.symlink_to("/dev/zero")
        return f"unreadable: read {victim.relative_to(target)}: a symbolic link, not a regular file"
    if case == "revision-elsewhere":
        rev.rename(tmp_path / "elsewhere")
        rev.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
        return f"unreadable: read {REV}/metadata.json: {REV} is a symbolic link, not a folder"
    if case == "LATEST-pipe":
        latest.unlink()
        os.mkfifo(latest)
        return "unreadable: read LATEST: a pipe, not a regular file"
    victim = latest if case == "LATEST-1TB" else tokenizer
    with open(victim, "ab") as fh:
        fh.truncate(1 << 40)  # sparse: no disk used
    if victim == latest:
        return f"LATEST: {1 << 40} bytes, over the 256 a pointer may take"
    return f"{REV}/tokenizer.json: size {1 << 40} != manifest {tokenizer_bytes}"


@pytest.mark.integration
class TestHostileBucket:
    """On S3 too: a large object is refused by its length before it is read, and what is loaded
    is what was hashed, whatever the bucket serves afterwards."""

    @pytest.mark.parametrize("key", ["LATEST", f"{REV}/metadata.json"])
    def test_a_large_object_is_not_read(self, server: MotoServer, tmp_path: Path, key: str) -> None:
        storage = S3Storage(TARGET, server.url)
        storage.put_bytes("LATEST", f"{REV}\n".encode())
        storage.put_bytes(key, b"x" * (32 << 20))
        what = "a pointer" if key == "LATEST" else "a manifest"
        limit = LIMITS.pointer_bytes if key == "LATEST" else LIMITS.manifest_bytes
        expected = [f"{storage.describe()}: {key}: {32 << 20} bytes, over the {limit} {what} may take"]
        assert verify_target(TARGET, server.url) == expected
        (_, problems), peak = _traced_peak(lambda: fetch_revision(storage, tmp_path / "copy"))
        assert problems == expected
        assert peak < 4 << 20, peak  # the 32 MB never came in

    def test_what_is_loaded_is_what_was_hashed(self, server: MotoServer, hf_files: dict[str, bytes],
                                               tmp_path: Path) -> None:
        storage = _Swapping(TARGET, server.url)
        for name, data in hf_files.items():
            storage.put_bytes(f"{REV}/{name}", data)
        storage.put_bytes(f"{REV}/metadata.json", manifest(hf_files))
        storage.put_bytes("LATEST", f"{REV}\n".encode())
        rev, problems = fetch_revision(storage, tmp_path / "copy")
        assert problems == [] and rev is not None
        assert check_revision(rev) == []  # the good weights, as hashed, though the bucket now serves NaN
        assert (rev.folder / "model.safetensors").read_bytes() == hf_files["model.safetensors"]
        assert storage.fetched == {f"{REV}/{name}": 1 for name in hf_files}  # each file read once
        (problem,) = verify_target(TARGET, server.url)  # a fresh check sees the swap
        assert problem.startswith(f"{storage.describe()}: {REV}/model.safetensors: sha256")


class _Swapping(S3Storage):
    """A bucket whose owner replaces the weights with NaN as soon as they have been read once."""

    def __init__(self, target: str, endpoint: str) -> None:
        super().__init__(target, endpoint)
        self.fetched: dict[str, int] = {}

    def fetch(self, key: str, dest: Path | None, max_bytes: int) -> tuple[int, str] | None:
        self.fetched[key] = self.fetched.get(key, 0) + 1
        got = super().fetch(key, dest, max_bytes)
        if key.endswith("model.safetensors") and dest is not None:
            from safetensors.torch import load

            weights = load(dest.read_bytes())
            bad = save({k: torch.full_like(v, math.nan) for k, v in weights.items()}, metadata={"format": "pt"})
            self.put_bytes(key, bad)
        return got

