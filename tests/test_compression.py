"""The pseudo-gradient codec, its error feedback, its artifact, and verify-upload on it."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from daemon.compression import CodecSpec, ErrorFeedback, artifact, decode, encode
from daemon.compression.codec import keep_count
from daemon.compression.sync import pack, unpack
from daemon.run.lifecycle import Lifecycle
from daemon.run.local import cpu_run
from daemon.upload import Uploader, verify_target
from tests.conftest import cli, small_lm_sets, small_sets


def grads(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(256, 688, generator=g),  # 688 = 16 x 43: blocks of 64 x 43
        "embed.weight": torch.randn(512, 128, generator=g),
        "norm.weight": torch.randn(256, generator=g),  # a vector: sent dense
        "conv.weight": torch.randn(64, 8, 3, 3, generator=g),  # four dimensions: rows x the rest
    }


class TestRoundTrip:
    def test_none_and_keep_all_are_exact(self) -> None:
        x = grads()
        for spec in (CodecSpec("none"), CodecSpec("topk", keep=1.0, quantize=False),
                     CodecSpec("dct_topk", keep=1.0, quantize=False)):
            y = decode(encode(x, spec))
            for n in x:
                assert y[n].shape == x[n].shape
                assert torch.allclose(y[n], x[n], atol=1e-4), (spec, n)

    def test_the_largest_block_the_config_allows_round_trips(self) -> None:
        """181 x 181 = 32,761 values: the last index still fits the int16 the artifact stores."""
        x = {"w": torch.randn(181, 362)}
        enc = encode(x, CodecSpec("topk", block=181, keep=1.0, quantize=False))
        assert enc.tensors["w.indices"].dtype == torch.int16 and int(enc.tensors["w.indices"].max()) == 181 * 181 - 1
        assert torch.allclose(decode(enc)["w"], x["w"], atol=1e-5)

    @pytest.mark.parametrize("name", ["topk", "dct_topk"])
    @pytest.mark.parametrize("quantize", [False, True])
    def test_error_within_the_bound(self, name: str, quantize: bool) -> None:
        """Top-k keeps the largest share of each block's energy (in the DCT domain an
        orthonormal transform keeps energies), so the squared error is at most the dropped
        share of it; 8 bits add at most half a step (scale / 2) per kept value."""
        x, spec = grads(), CodecSpec(name, keep=1 / 32, quantize=quantize)
        enc = encode(x, spec)
        y = decode(enc)
        for n, t in x.items():
            lay = enc.header["tensors"][n]
            if lay["layout"] == "dense":
                assert torch.equal(y[n], t)
                continue
            bm, bn = lay["block"]
            kept = keep_count(bm, bn, spec.keep) / (bm * bn)
            bound = (1 - kept) * float(t.pow(2).sum())
            if quantize:
                scales = enc.tensors[f"{n}.scales"]
                bound += float((scales / 2).pow(2).sum()) * lay["k"] + 1e-3
            err = float((y[n] - t).pow(2).sum())
            assert err <= bound * 1.0001, (n, err, bound)
            assert err > 0  # it is lossy: a bound that held trivially would prove nothing

    def test_dct_recovers_a_smooth_update_topk_cannot(self) -> None:
        """Pseudo-gradients are smooth along their dimensions more than random: in the DCT
        domain their energy sits in few coefficients, which is why DeMo-style codecs use it."""
        i = torch.linspace(0, 1, 128)
        smooth = {"w": torch.outer(torch.sin(3 * i), torch.cos(2 * i))}
        err = {}
        for name in ("topk", "dct_topk"):
            y = decode(encode(smooth, CodecSpec(name, quantize=False)))["w"]
            err[name] = float((y - smooth["w"]).norm() / smooth["w"].norm())
        assert err["dct_topk"] < 0.01 < 0.5 < err["topk"], err

    def test_default_bytes_ratio(self) -> None:
        x = grads()
        enc = encode(x, CodecSpec())
        dense = sum(t.numel() * 4 for t in x.values())
        assert dense / enc.nbytes >= 32
        assert enc.header["codec"] == "dct_topk" and enc.header["quantize"] is True

    def test_pack_unpack(self) -> None:
        enc = encode(grads(), CodecSpec())
        flat = pack(enc.tensors)
        assert flat.dtype == torch.uint8 and flat.numel() == enc.nbytes
        back = unpack(flat, enc.tensors)
        assert all(torch.equal(back[n], t) for n, t in enc.tensors.items())


class TestErrorFeedback:
    def test_sum_sent_converges_to_sum_true(self) -> None:
        """What is not sent waits in the residual: sum(sent) = sum(true) - residual, and the
        residual stays bounded while the sums grow, so their relative gap shrinks round by
        round. Without feedback the gap stays where the codec's error puts it."""
        g = torch.Generator().manual_seed(1)
        drift = torch.randn(128, 256, generator=g) * 0.1
        ef = ErrorFeedback(CodecSpec())
        true_sum = torch.zeros(128, 256)
        sent_sum = torch.zeros(128, 256)
        plain_sum = torch.zeros(128, 256)
        gaps = []
        for r in range(1, 201):
            step = drift + torch.randn(128, 256, generator=g)
            true_sum += step
            _, sent = ef.encode({"w": step})
            sent_sum += sent["w"]
            plain_sum += decode(encode({"w": step}, CodecSpec()))["w"]
            if r % 50 == 0:
                gaps.append(float((true_sum - sent_sum).norm() / true_sum.norm()))
        assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 0.15, gaps
        assert torch.allclose(true_sum - sent_sum, ef.residual["w"], atol=1e-2)
        assert float((true_sum - plain_sum).norm() / true_sum.norm()) > 0.5

    def test_state_round_trip(self) -> None:
        ef = ErrorFeedback(CodecSpec())
        ef.encode(grads())
        again = ErrorFeedback(CodecSpec())
        again.load_state_dict(ef.state_dict())
        x = grads(2)
        a, _ = ef.encode(x)
        b, _ = again.encode(x)
        assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)


def shapes(x: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {n: list(t.shape) for n, t in x.items()}


class TestArtifactProblems:
    """Each tampering of the artifact is one line naming the tensor and what is wrong."""

    def _files(self) -> tuple[dict, dict[str, torch.Tensor], dict[str, list[int]]]:
        x = grads()
        enc = encode(x, CodecSpec())
        return json.loads(json.dumps(enc.header)), dict(enc.tensors), shapes(x)

    def test_intact(self) -> None:
        header, tensors, expected = self._files()
        assert artifact.problems(header, tensors, expected) == []

    @pytest.mark.parametrize(("tamper", "needle"), [
        ("index", "an index lies outside its block"),
        ("repeat", "an index repeats within a block"),
        ("scale", "scales not finite"),
        ("dense", "dense values not finite"),
        ("codec", "unknown codec 'zstd'"),
        ("shape", "shape [256, 688] but the model's is [688, 256]"),
        ("stray", "tensor(s) the header does not describe"),
        ("missing", "lacks 1 of the model's parameters"),
    ])
    def test_tampered(self, tamper: str, needle: str) -> None:
        header, tensors, expected = self._files()
        if tamper == "index":
            tensors["layer.weight.indices"][3, 0] = 64 * 43
        elif tamper == "repeat":
            idx = tensors["layer.weight.indices"]
            idx[0, 1] = idx[0, 0]
        elif tamper == "scale":
            tensors["embed.weight.scales"][0] = float("inf")
        elif tamper == "dense":
            tensors["norm.weight.dense"][5] = float("nan")
        elif tamper == "codec":
            header["codec"] = "zstd"
        elif tamper == "shape":
            expected["layer.weight"] = [688, 256]
        elif tamper == "stray":
            tensors["extra"] = torch.zeros(3)
        elif tamper == "missing":
            expected["lm_head.weight"] = [10, 10]
        found = artifact.problems(header, tensors, expected)
        assert len(found) == 1 and needle in found[0], found


def publish(tmp_path: Path, sets: list[str]) -> Path:
    """Train a few steps with the uploader running and force one revision; returns the target."""
    run, _, _ = cpu_run(sets)
    uploader = next(c for c in run.components if isinstance(c, Uploader))
    life = Lifecycle()
    life.start(uploader)
    t = run.trainer
    for _ in range(3):
        t.inner_step()
    uploader.request_upload()
    t.inner_step()
    assert uploader.wait_idle(60)
    life.stop_all(10)
    return Path(t.cfg.state_dir) / "uploads"


def rewrite_manifest(rev: Path, fname: str) -> None:
    """Make the manifest agree with a tampered file, as a forger would: the checksums then
    pass and only the decoding checks can catch it."""
    manifest = json.loads((rev / "metadata.json").read_text())
    data = (rev / fname).read_bytes()
    manifest["files"][fname] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (rev / "metadata.json").write_text(json.dumps(manifest))


UP = ("upload.enabled=true", "upload.min_inner_step=0", "upload.every_inner_steps=1000")


class TestPublishedArtifact:
    def test_language_model_both(self, tmp_path: Path) -> None:
        """The subnet-38 layout: weights, config, tokenizer and the pseudo-gradient, which
        decodes to what the round moved the weights by (within the codec's error)."""
        sets = small_lm_sets(tmp_path / "s", *UP, "upload.artifact=both", "train.inner_steps_per_outer=100")
        target = publish(tmp_path, sets)
        rev = target / (target / "LATEST").read_text().strip()
        names = {p.name for p in rev.iterdir()}
        assert {"model.safetensors", "config.json", "optimizer.pt", artifact.TENSORS_FILE,
                artifact.HEADER_FILE} <= names
        header = json.loads((rev / artifact.HEADER_FILE).read_text())
        assert header["codec"] == "dct_topk" and header["outer_step"] == 0 and header["inner_steps"] == 4
        manifest = json.loads((rev / "metadata.json").read_text())
        assert manifest["artifact"] == "both"
        assert verify_target(str(target)) == []
        # The artifact points from the round's start towards the published weights.
        from daemon.compression.codec import Encoded
        pg = decode(Encoded(load_file(str(rev / artifact.TENSORS_FILE)), header))
        start, _, _ = cpu_run(small_lm_sets(tmp_path / "fresh"))  # same seed: the round's starting weights
        anchor = dict(start.trainer.model.named_parameters())
        weights = load_file(str(rev / "model.safetensors"))
        name = "model.layers.0.mlp.up_proj.weight"
        moved = {n: anchor[n].detach() - weights[n] for n in pg}
        again = decode(encode(moved, CodecSpec()))
        assert all(torch.allclose(again[n], pg[n], atol=1e-6) for n in pg)
        assert float(pg[name].norm()) > 0
        # A tampered index, the manifest forged to match: one line.
        tensors = load_file(str(rev / artifact.TENSORS_FILE))
        tensors[f"{name}.indices"][0, 0] = 32767
        save_file(tensors, str(rev / artifact.TENSORS_FILE), metadata={"format": "pt"})
        rewrite_manifest(rev, artifact.TENSORS_FILE)
        (problem,) = verify_target(str(target))
        assert name in problem and "an index lies outside its block" in problem

    def test_two_tower_pseudo_gradient_alone(self, tmp_path: Path) -> None:
        """Without the weights: model_shapes.json says the shapes, no optimizer state, a
        revision a small fraction of the weights' size."""
        sets = small_sets(tmp_path / "s", *UP, "upload.artifact=pseudo_gradient", "upload.compression=topk")
        target = publish(tmp_path, sets)
        rev = target / (target / "LATEST").read_text().strip()
        names = {p.name for p in rev.iterdir()}
        assert names == {"model_shapes.json", artifact.TENSORS_FILE, artifact.HEADER_FILE, "metadata.json"}
        assert json.loads((rev / artifact.HEADER_FILE).read_text())["codec"] == "topk"
        assert verify_target(str(target)) == []
        # Truncated, and the manifest forged to match: one line, no traceback.
        data = (rev / artifact.TENSORS_FILE).read_bytes()
        (rev / artifact.TENSORS_FILE).write_bytes(data[: len(data) // 2])
        rewrite_manifest(rev, artifact.TENSORS_FILE)
        (problem,) = verify_target(str(target))
        assert artifact.TENSORS_FILE in problem and "not a safetensors file" in problem
        # Truncated with the manifest left alone: the size says it, once.
        (rev / artifact.TENSORS_FILE).write_bytes(data[:100])
        code, out, err = cli("verify-upload", str(target))
        assert code != 0 and "Traceback" not in err + out
        lines = [x for x in (out + err).splitlines() if artifact.TENSORS_FILE in x]
        assert len(lines) == 1 and "size 100 != manifest" in lines[0], out + err

    def test_metrics_and_status(self, tmp_path: Path) -> None:
        sets = small_sets(tmp_path / "s", *UP, "upload.artifact=pseudo_gradient")
        run, registry, state = cpu_run(sets)
        uploader = next(c for c in run.components if isinstance(c, Uploader))
        life = Lifecycle()
        life.start(uploader)
        uploader.request_upload()
        run.trainer.inner_step()
        assert uploader.wait_idle(60)
        life.stop_all(10)
        up = state.section("compression")["upload"]
        assert up["count"] == 1 and up["last_ratio"] > 1 and up["encode_seconds"] > 0
        assert registry.get_sample_value("minerd_compressed_bytes_total", {"use": "upload"}) == up["last_bytes"]
        ratio = registry.get_sample_value("minerd_compression_ratio", {"use": "upload"})
        assert ratio is not None and math.isclose(ratio, up["last_ratio"], rel_tol=0.01)
