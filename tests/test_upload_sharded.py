"""Large models in the sharded Hugging Face layout: weights over ``upload.shard_bytes`` are
published as ``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json``, load
with ``from_pretrained``, pass ``minerd verify-upload``, go to S3 in parts; a forged index is
refused in one line.

The model is the tiny preset (about 5M parameters, 21 MB in float32) cut at 2 MiB, so a
revision has several shards as an 8B model's 32 GB in 5 GB shards would.
"""

from __future__ import annotations

import hashlib
import json
import math
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import load, save
from transformers import PreTrainedModel

from daemon.compression import artifact
from daemon.compression.codec import Encoded, decode
from daemon.config import UploadConfig
from daemon.storage import LocalStorage, S3Storage, Storage
from daemon.tasks.causal_lm.export import HfLayout
from daemon.tasks.causal_lm.model import llama_config
from daemon.upload import Uploader, verify_target
from daemon.upload.layout import MODEL_FILE, MODEL_INDEX_FILE, write_weights
from daemon.upload.limits import LIMITS
from tests import test_upload_s3
from tests.conftest import BUCKET, MotoServer, cli
from tests.test_hostile_uploads import REV, forge, tiny_hf_files
from tests.test_upload_s3 import TARGET

server = test_upload_s3.server  # the moto fixture

MiB = 1 << 20
SHARD_BYTES = 2 * MiB


def tiny_lm() -> tuple[PreTrainedModel, HfLayout]:
    """The tiny preset at a vocabulary of 8192, and the layout the language-model task builds for it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(1)
    torch.manual_seed(0)
    words = ["[UNK]", "def", "add", "return", "the", "a", "b", "fox", "dog", "quick"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]")
    model = LlamaForCausalLM(llama_config("tiny", 8192, 0))
    return model, HfLayout.of(model, fast)


def _cfg(**kw: object) -> UploadConfig:
    base = {"min_inner_step": 0, "every_inner_steps": 1, "keep": 2, "min_interval_seconds": 0}
    return UploadConfig.model_validate(base | kw)


class _Recording(LocalStorage):
    """A real directory that remembers the order objects were stored in."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.order: list[str] = []

    def put_file(self, key: str, src: Path) -> None:
        super().put_file(key, src)
        self.order.append(key.split("/")[-1])

    def put_bytes(self, key: str, data: bytes) -> None:
        super().put_bytes(key, data)
        self.order.append(key.split("/")[-1])


def publish(storage: Storage, staging: Path, model: torch.nn.Module, layout: HfLayout | None, cfg: UploadConfig,
            anchor: list[torch.Tensor] | None = None) -> None:
    """One revision (rev-0-1) of ``model`` through the real uploader."""
    up = Uploader(cfg, storage, staging, CollectorRegistry(), config_hash="h", layout=layout)
    up.start()
    try:
        assert up.on_inner_step(0, 1, 0.5, model, None, anchor=anchor).allowed
        assert up.wait_idle(120)
    finally:
        assert up.stop(10)
    assert up.status()["last_revision"] == "rev-0-1", up.status()["last_error"]


def shard_names(n: int, stem: str = "model") -> list[str]:
    return [f"{stem}-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


class TestShardedPublish:
    """Weights over upload.shard_bytes become shards and an index that transformers loads."""

    def test_shards_index_manifest_and_logits(self, tmp_path: Path) -> None:
        from transformers import AutoModelForCausalLM

        model, layout = tiny_lm()
        storage = _Recording(tmp_path / "up")
        publish(storage, tmp_path / "staging", model, layout, _cfg(shard_bytes=SHARD_BYTES))
        rev = tmp_path / "up" / "rev-0-1"
        index = json.loads((rev / MODEL_INDEX_FILE).read_text())
        n = len(set(index["weight_map"].values()))
        shards = shard_names(n)
        # 1. save_pretrained's layout: shards 1..n of n, every tensor once, no single file.
        assert n >= 5 and not (rev / MODEL_FILE).exists()
        assert sorted(p.name for p in rev.glob("model*.safetensors")) == shards
        state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: once
        assert set(index["weight_map"]) == set(state)
        assert index["metadata"] == {"total_size": sum(t.numel() * 4 for t in state.values())}
        for shard in shards:
            held = load((rev / shard).read_bytes())
            assert all(index["weight_map"][k] == shard and torch.equal(v, state[k]) for k, v in held.items())
            # At most shard_bytes of tensors, or one tensor alone (the 8 MiB embedding).
            assert len(held) == 1 or sum(t.numel() * 4 for t in held.values()) <= SHARD_BYTES
        # The files save_pretrained itself cuts, and the index it writes (less its parameter count).
        model.save_pretrained(tmp_path / "hf", max_shard_size=SHARD_BYTES)
        theirs = json.loads((tmp_path / "hf" / MODEL_INDEX_FILE).read_text())
        assert theirs["weight_map"] == index["weight_map"]
        assert theirs["metadata"]["total_size"] == index["metadata"]["total_size"]
        assert all((tmp_path / "hf" / shard).read_bytes() == (rev / shard).read_bytes() for shard in shards)
        # 2. The manifest lists every file with its size and sha256, and is stored after them, LATEST last.
        manifest = json.loads((rev / "metadata.json").read_text())
        assert {*shards, MODEL_INDEX_FILE, "config.json", "tokenizer.json"} <= set(manifest["files"])
        for name, entry in manifest["files"].items():
            data = (rev / name).read_bytes()
            assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert storage.order[-2:] == ["metadata.json", "LATEST"]
        assert set(storage.order[:-2]) == set(manifest["files"])
        # 3. verify-upload passes, the transformers round trip included.
        code, _, err = cli("verify-upload", str(tmp_path / "up"))
        assert code == 0, err
        # 4. from_pretrained of the folder computes what the model that was written computes.
        loaded = AutoModelForCausalLM.from_pretrained(str(rev), local_files_only=True, trust_remote_code=False,
                                                      dtype=torch.float32)
        ids = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)

    def test_at_or_below_the_limit_one_file(self, tmp_path: Path) -> None:
        model, layout = tiny_lm()
        publish(LocalStorage(tmp_path / "up"), tmp_path / "staging", model, layout, _cfg())  # 5 GB
        rev = tmp_path / "up" / "rev-0-1"
        assert (rev / MODEL_FILE).exists() and not (rev / MODEL_INDEX_FILE).exists()
        assert not list(rev.glob("model-*"))
        # Exactly at the limit is still one file: only more than shard_bytes is split.
        weights = {"a": torch.zeros(MiB // 4), "b": torch.zeros(MiB // 4)}
        assert write_weights(weights, tmp_path / "exact", 2 * MiB) == [MODEL_FILE]
        assert write_weights(weights, tmp_path / "over", 2 * MiB - 1) == [*shard_names(2), MODEL_INDEX_FILE]

    def test_plain_layout_and_pseudo_gradient(self, tmp_path: Path) -> None:
        """The two-tower layout is sharded too, and so is a pseudo-gradient sent dense (codec none),
        which decodes from its shards to what the step moved the weights by."""
        torch.manual_seed(0)
        model = torch.nn.Sequential(*(torch.nn.Linear(256, 256) for _ in range(6)))
        anchor = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        cfg = _cfg(shard_bytes=MiB, artifact="both", compression="none")
        publish(LocalStorage(tmp_path / "up"), tmp_path / "staging", model, None, cfg, anchor=anchor)
        rev = tmp_path / "up" / "rev-0-1"
        index = json.loads((rev / artifact.TENSORS_INDEX).read_text())
        n = len(set(index["weight_map"].values()))
        assert n >= 2 and sorted(p.name for p in rev.glob("pseudo_gradient-*")) == shard_names(n, "pseudo_gradient")
        assert not (rev / artifact.TENSORS_FILE).exists() and (rev / MODEL_INDEX_FILE).exists()
        assert verify_target(str(tmp_path / "up")) == []
        header = json.loads((rev / artifact.HEADER_FILE).read_text())
        tensors = artifact.TensorFile(*(rev / name for name in shard_names(n, "pseudo_gradient")))
        pg = decode(Encoded({k: tensors[k] for k in tensors}, header))
        for (name, p), a in zip(model.named_parameters(), anchor, strict=True):
            assert torch.equal(pg[name], a - p.detach())


@pytest.mark.integration
class TestShardedS3:
    """Shards and a large optimizer state go to S3 as multipart uploads; verify-upload passes."""

    def test_multipart_upload_and_verify(self, server: MotoServer, tmp_path: Path) -> None:
        model, layout = tiny_lm()
        storage = S3Storage(TARGET, server.url, multipart_bytes=MiB)
        publish(storage, tmp_path / "staging", model, layout, _cfg(shard_bytes=SHARD_BYTES, backend="s3",
                                                                   target=TARGET, endpoint_url=server.url))
        manifest = json.loads(storage.get_bytes("rev-0-1/metadata.json") or b"{}")
        shards = [name for name in manifest["files"] if name.startswith("model-")]
        assert len(shards) >= 5 and MODEL_INDEX_FILE in manifest["files"]
        # boto3 raises a part to S3's 5 MiB minimum: the 8 MiB embedding's shard goes in two.
        part = 5 * MiB
        parts = {}
        client = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1")
        for name, entry in manifest["files"].items():
            etag = client.head_object(Bucket=BUCKET, Key=f"runs/a/rev-0-1/{name}")["ETag"].strip('"')
            if entry["size"] >= MiB:
                # A multipart object's ETag is "<md5 of the parts' md5s>-<parts>".
                assert etag.endswith(f"-{math.ceil(entry['size'] / part)}"), (name, etag)
                parts[name] = int(etag.rsplit("-", 1)[1])
            else:
                assert "-" not in etag, (name, etag)
        assert max(parts.values()) >= 2 and len(set(shards) & set(parts)) >= 5
        code, out, err = cli("verify-upload", TARGET, "--endpoint-url", server.url)
        assert code == 0 and out.strip() == f"{TARGET}: ok", err

    def test_the_threshold_stays_below_the_single_put_limit(self, server: MotoServer) -> None:
        with pytest.raises(ValueError, match="multipart_bytes"):
            S3Storage(TARGET, server.url, multipart_bytes=(5 << 30) + 1)


# ---- forged indexes ------------------------------------------------------------------------

SMALL_SHARD = 4096  # the one-layer Llama of tiny_hf_files (14.5 KB) in 5 shards


@pytest.fixture(scope="module")
def sharded_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """tiny_hf_files with its weights in shards and an index, as the publisher writes them."""
    files = tiny_hf_files()
    weights = dict(sorted(load(files.pop(MODEL_FILE)).items()))  # load's order varies from run to run
    folder = tmp_path_factory.mktemp("shards")
    for name in write_weights(weights, folder, SMALL_SHARD):
        files[name] = (folder / name).read_bytes()
    return files


def _index(files: dict[str, bytes]) -> dict[str, Any]:
    return dict(json.loads(files[MODEL_INDEX_FILE]))


def _with_index(files: dict[str, bytes], index: dict[str, Any]) -> dict[str, bytes]:
    return {**files, MODEL_INDEX_FILE: json.dumps(index).encode()}


def _shards(files: dict[str, bytes]) -> list[str]:
    return sorted(name for name in files if name.startswith("model-"))


def _not_in_manifest(files: dict[str, bytes]) -> tuple[dict[str, bytes], str]:
    last = _shards(files)[-1]
    return {k: v for k, v in files.items() if k != last}, \
        f"{MODEL_INDEX_FILE}: names {last}, which the manifest does not list"


def _slash(files: dict[str, bytes]) -> tuple[dict[str, bytes], str]:
    index = _index(files)
    first = _shards(files)[0]
    tensor = next(t for t, f in index["weight_map"].items() if f == first)
    index["weight_map"][tensor] = f"sub/{first}"
    return _with_index(files, index), f"{MODEL_INDEX_FILE}: names 'sub/{first}', not a shard of this revision " \
        "(model-00001-of-00002.safetensors)"


def _in_two_shards(files: dict[str, bytes]) -> tuple[dict[str, bytes], str]:
    first, second = _shards(files)[:2]
    one, two = load(files[first]), load(files[second])
    tensor = sorted(one)[0]
    two[tensor] = one[tensor]
    return {**files, second: save(two, metadata={"format": "pt"})}, \
        f"{second}: holds tensor {tensor!r}, which {first} holds too"


def _unmapped(files: dict[str, bytes]) -> tuple[dict[str, bytes], str]:
    index = _index(files)
    shards = list(index["weight_map"].values())
    # From a shard the index still names by its other tensors.
    tensor, shard = next((t, f) for t, f in sorted(index["weight_map"].items()) if shards.count(f) > 1)
    del index["weight_map"][tensor]
    return _with_index(files, index), f"{MODEL_INDEX_FILE}: does not name tensor {tensor!r}, which {shard} holds"


def _held_by_none(files: dict[str, bytes]) -> tuple[dict[str, bytes], str]:
    index = _index(files)
    index["weight_map"]["model.layers.7.mlp.up_proj.weight"] = _shards(files)[0]
    return _with_index(files, index), f"{MODEL_INDEX_FILE}: names 1 tensor(s) no shard holds, e.g. " \
        "'model.layers.7.mlp.up_proj.weight'"


def _missing_everywhere(files: dict[str, bytes]) -> tuple[dict[str, bytes], str]:
    """A tensor gone from its shard and from the index: the index agrees, the config does not."""
    index = _index(files)
    tensor, shard = "model.norm.weight", index["weight_map"].pop("model.norm.weight")
    held = load(files[shard])
    del held[tensor]
    return {**_with_index(files, index), shard: save(held, metadata={"format": "pt"})}, \
        f"config.json: describes a model of 3,632 parameters, the shards {MODEL_INDEX_FILE} names hold 3,616"


def _unnamed_shard(files: dict[str, bytes]) -> tuple[dict[str, bytes], str]:
    n = len(_shards(files))
    extra = f"model-{n + 1:05d}-of-{n + 1:05d}.safetensors"
    return {**files, extra: save({"x": torch.zeros(1)}, metadata={"format": "pt"})}, \
        f"{extra}: listed in the manifest, but {MODEL_INDEX_FILE} names no tensor in it"


def _beside_single(files: dict[str, bytes]) -> tuple[dict[str, bytes], str]:
    return {**files, MODEL_FILE: tiny_hf_files()[MODEL_FILE]}, \
        f"{MODEL_FILE}: listed beside {MODEL_INDEX_FILE}; the tensors are in one file or in shards, not both"


def _oversized(files: dict[str, bytes]) -> tuple[dict[str, bytes], str]:
    data = files[MODEL_INDEX_FILE] + b" " * LIMITS.index_bytes  # valid JSON, one byte per space
    return {**files, MODEL_INDEX_FILE: data}, \
        f"{MODEL_INDEX_FILE}: manifest size {len(data)} is over the {LIMITS.index_bytes} bytes this file may take"


def _no_weight_map(files: dict[str, bytes]) -> tuple[dict[str, bytes], str]:
    return _with_index(files, {"metadata": {}, "weight_map": ["model-00001-of-00004.safetensors"]}), \
        f"{MODEL_INDEX_FILE}: has no weight_map of tensor names to shard files"


FORGERIES = {"names-a-file-not-in-the-manifest": _not_in_manifest, "a-path-with-a-slash": _slash,
             "a-tensor-in-two-shards": _in_two_shards, "a-tensor-the-index-does-not-name": _unmapped,
             "a-tensor-no-shard-holds": _held_by_none, "a-tensor-missing": _missing_everywhere,
             "a-shard-left-unnamed": _unnamed_shard, "beside-model-safetensors": _beside_single,
             "an-oversized-index": _oversized, "no-weight-map": _no_weight_map}


class TestForgedIndex:
    """What the index says is checked against the manifest and the shards' own headers before
    anything loads; each forgery is one line naming the file."""

    def test_the_forger_starts_from_a_revision_that_passes(self, tmp_path: Path,
                                                           sharded_files: dict[str, bytes]) -> None:
        assert len(_shards(sharded_files)) == 5
        forge(tmp_path / "up", sharded_files)
        assert verify_target(str(tmp_path / "up")) == []

    @pytest.mark.parametrize("forgery", list(FORGERIES))
    def test_refused_in_one_line(self, tmp_path: Path, sharded_files: dict[str, bytes], forgery: str) -> None:
        files, expected = FORGERIES[forgery](sharded_files)
        target = tmp_path / "up"
        forge(target, files)
        assert verify_target(str(target)) == [f"{target}: {REV}/{expected}"]

    def test_shard_headers_share_one_headers_cap(self, tmp_path: Path, sharded_files: dict[str, bytes]) -> None:
        """Each header is within the cap, together they are not: a forger cannot multiply the cap
        by the number of shards."""
        target = tmp_path / "up"
        forge(target, sharded_files)
        sizes = [int.from_bytes(sharded_files[name][:8], "little") for name in _shards(sharded_files)]
        limits = replace(LIMITS, safetensors_header=sum(sizes) - 1)
        last = _shards(sharded_files)[-1]
        assert verify_target(str(target), limits=limits) == [
            f"{target}: {REV}/{last}: the shards' headers take more than the {sum(sizes) - 1} bytes one header may"]

    def test_a_crowded_index_costs_little(self, tmp_path: Path, sharded_files: dict[str, bytes]) -> None:
        """An index just under its cap, naming 80,000 tensors no shard holds: one line, and the
        check's memory stays within a few times the file's size."""
        index = _index(sharded_files)
        first = _shards(sharded_files)[0]
        index["weight_map"].update({f"t{i}": first for i in range(80_000)})
        data = json.dumps(index).encode()
        assert len(data) < LIMITS.index_bytes
        target = tmp_path / "up"
        forge(target, {**sharded_files, MODEL_INDEX_FILE: data})
        tracemalloc.start()
        try:
            problems = verify_target(str(target))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert problems == [f"{target}: {REV}/{MODEL_INDEX_FILE}: names 80000 tensor(s) no shard holds, e.g. 't0'"]
        assert peak < 64 * MiB, peak
