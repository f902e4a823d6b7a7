"""Checkpoints: atomic, verified, and the previous one used when the newest is bad."""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from daemon import statefile
from daemon.checkpoint import CheckpointStore


def save(store: CheckpointStore, step: int) -> Path:
    model = {"w": torch.full((64, 64), float(step))}
    return store.save(step, model, {"counters": {"global_step": step}}, {"outer_step": 0, "inner_step": step})


class TestStore:
    """Save, keep K, verify, fall back."""

    def test_keeps_last_k_and_loads_newest(self, tmp_path: Path) -> None:
        store = CheckpointStore(tmp_path, keep=2)
        store.prepare()
        for step in (5, 10, 15):
            save(store, step)
        assert [p.name for p in store.checkpoints()] == ["step-0000000015", "step-0000000010"]
        ck = store.load_latest()
        assert ck is not None and ck.state["counters"]["global_step"] == 15
        assert float(ck.model["w"][0, 0]) == 15.0
        manifest = json.loads((ck.path / "manifest.json").read_text())
        assert set(manifest["files"]) == {"model.safetensors", "train_state.safetensors", "train_state.json"}

    def test_truncated_newest_falls_back(self, tmp_path: Path) -> None:
        store = CheckpointStore(tmp_path, keep=3)
        save(store, 1)
        newest = save(store, 2)
        f = newest / "model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
        ck = store.load_latest()
        assert ck is not None and ck.state["counters"]["global_step"] == 1

    def test_flipped_byte_falls_back(self, tmp_path: Path) -> None:
        store = CheckpointStore(tmp_path, keep=3)
        save(store, 1)
        newest = save(store, 2)
        f = newest / "train_state.safetensors"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
        ck = store.load_latest()
        assert ck is not None and ck.state["counters"]["global_step"] == 1

    def test_leftover_temp_dir_is_ignored_and_cleared(self, tmp_path: Path) -> None:
        store = CheckpointStore(tmp_path, keep=3)
        save(store, 1)
        (tmp_path / ".tmp-step-0000000002-123").mkdir()
        (tmp_path / ".tmp-step-0000000002-123" / "model.safetensors").write_bytes(b"partial")
        store.prepare()
        assert not list(tmp_path.glob(".tmp-*"))
        ck = store.load_latest()
        assert ck is not None and ck.state["counters"]["global_step"] == 1


def rewrite(path: Path, name: str, data: bytes) -> None:
    """Replace one file of a checkpoint and keep its manifest consistent: corruption the
    checksums cannot see."""
    (path / name).write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))


class _Evil:
    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (print, ("a pickle ran code",))


class TestHostileCheckpoints:
    """A checkpoint that is malformed, or written to run code, is skipped for the previous one."""

    def _two(self, tmp_path: Path) -> tuple[CheckpointStore, Path]:
        store = CheckpointStore(tmp_path, keep=3)
        save(store, 1)
        return store, save(store, 2)

    @pytest.mark.parametrize(
        "files",
        [{}, [], {"model.safetensors": {"size": 1, "sha256": "x"}}, {"model.safetensors": "no entry"}],
        ids=["empty", "a list", "model only", "no entry"],
    )
    def test_a_manifest_that_skips_files(self, tmp_path: Path, files: object) -> None:
        store, newest = self._two(tmp_path)
        manifest = json.loads((newest / "manifest.json").read_text())
        manifest["files"] = files
        (newest / "manifest.json").write_text(json.dumps(manifest))
        w = newest / "model.safetensors"
        w.write_bytes(w.read_bytes()[:-8] + b"\xff" * 8)  # corrupt weights a skipped check would load
        ck = store.load_latest()
        assert ck is not None and ck.state["counters"]["global_step"] == 1

    def test_a_manifest_that_is_not_json(self, tmp_path: Path) -> None:
        store, newest = self._two(tmp_path)
        (newest / "manifest.json").write_text("{not json")
        ck = store.load_latest()
        assert ck is not None and ck.state["counters"]["global_step"] == 1

    def test_a_skeleton_that_does_not_parse(self, tmp_path: Path) -> None:
        store, newest = self._two(tmp_path)
        rewrite(newest, "train_state.json", b'{"format": 1, "tree": {"__tensor__": "nope"}}')
        ck = store.load_latest()
        assert ck is not None and ck.state["counters"]["global_step"] == 1

    def test_a_pickle_in_a_legacy_checkpoint_is_not_run(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
        store, newest = self._two(tmp_path)
        (newest / "train_state.safetensors").unlink()
        (newest / "train_state.json").unlink()
        manifest = json.loads((newest / "manifest.json").read_text())
        manifest["files"] = {"model.safetensors": manifest["files"]["model.safetensors"]}
        (newest / "manifest.json").write_text(json.dumps(manifest))
        rewrite(newest, "train_state.pt", pickle.dumps({"counters": _Evil()}, protocol=2))
        ck = store.load_latest()
        assert ck is not None and ck.state["counters"]["global_step"] == 1
        assert "a pickle ran code" not in capsys.readouterr().out

    def test_a_legacy_checkpoint_still_loads(self, tmp_path: Path) -> None:
        store, newest = self._two(tmp_path)
        for name in ("train_state.safetensors", "train_state.json"):
            (newest / name).unlink()
        manifest = json.loads((newest / "manifest.json").read_text())
        manifest["files"] = {"model.safetensors": manifest["files"]["model.safetensors"]}
        (newest / "manifest.json").write_text(json.dumps(manifest))
        buf = newest / "train_state.pt"
        torch.save({"counters": {"global_step": 2}}, buf)
        rewrite(newest, "train_state.pt", buf.read_bytes())
        ck = store.load_latest()
        assert ck is not None and ck.state["counters"]["global_step"] == 2


class TestStateFile:
    """The training state's format keeps what an optimizer state dict holds."""

    def test_round_trip(self, tmp_path: Path) -> None:
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(model.parameters(), betas=(0.8, 0.95))
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        tree = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "loss": float("nan"),
                "none": None, "flags": [True, 1, "x"], "inf": float("-inf")}
        statefile.save(tree, tmp_path / "t.safetensors", tmp_path / "t.json")
        back = statefile.load(tmp_path / "t.safetensors", tmp_path / "t.json")
        assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)
        assert set(back["optimizer"]["state"]) == {0, 1}  # int keys stay ints
        assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
        assert torch.equal(back["rng"], tree["rng"]) and back["loss"] != back["loss"]
        assert back["flags"] == [True, 1, "x"] and back["none"] is None and back["inf"] == float("-inf")
        opt2 = torch.optim.AdamW(model.parameters())
        opt2.load_state_dict(back["optimizer"])

    def test_refuses_what_it_cannot_store(self) -> None:
        with pytest.raises(TypeError, match="cannot store a object"):
            statefile.pack({"x": object()})
