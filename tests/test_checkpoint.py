"""Checkpoints: atomic, verified, and the previous one used when the newest is bad."""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
        assert set(manifest["files"]) == {"model.safetensors", "train_state.pt"}

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
        f = newest / "train_state.pt"
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
