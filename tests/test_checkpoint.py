"""Checkpoints: atomic, verified, and the previous one used when the newest is bad."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from daemon import statefile
from daemon.checkpoint import CheckpointCorrupt, CheckpointStore
from daemon.rowtable import RowChanges, RowTable


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


class TestPruning:
    def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(self, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
        """The oldest checkpoint is removed as the newest is saved; a kill halfway through the
        removal (here: after its first file) leaves every step-* folder complete."""
        store = CheckpointStore(tmp_path, keep=1)
        store.prepare()
        for step in (1, 2):
            save(store, step)

        real = shutil.rmtree

        def killed_halfway(path: object, ignore_errors: bool = False) -> None:
            folder = Path(str(path))
            if not folder.exists():
                return real(folder, ignore_errors=ignore_errors)
            sorted(folder.iterdir())[0].unlink()
            raise KeyboardInterrupt  # the process dies here

        monkeypatch.setattr("daemon.checkpoint.shutil.rmtree", killed_halfway)
        with pytest.raises(KeyboardInterrupt):
            save(store, 3)
        monkeypatch.undo()
        for path in store.checkpoints():
            store.verify(path)  # complete, or not a step-* at all
        store.prepare()  # the next start clears what the removal left
        assert not list(tmp_path.glob(".tmp-*"))


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


class TestRowTables:
    """A row table is written whole once, then as the rows changed since; reads give the whole table."""

    N = 1000

    def save_rows(self, store: CheckpointStore, step: int, table: torch.Tensor, changes: RowChanges) -> Path:
        state = {"rows": RowTable.snapshot({"table": table, "steps": table[:, 0].long()}, changes)}
        return store.save(step, {"w": torch.zeros(2)}, state, {})

    def touch(self, table: torch.Tensor, changes: RowChanges, rows: list[int] | np.ndarray, value: float) -> None:
        table[torch.as_tensor(rows)] = value
        changes.mark(np.asarray(rows))

    def test_delta_until_a_quarter_changed_then_whole(self, tmp_path: Path) -> None:
        store = CheckpointStore(tmp_path, keep=2)
        store.prepare()
        table, changes = torch.zeros(self.N, 8), RowChanges(self.N)
        sizes, deps = [], []
        for step in range(1, 6):
            self.touch(table, changes, np.arange((step - 1) * 100, step * 100), float(step))
            path = self.save_rows(store, step, table, changes)
            sizes.append((path / "train_state.safetensors").stat().st_size)
            deps.append(CheckpointStore.depends_on(path))
            loaded = store.load(path).state["rows"]
            assert torch.equal(loaded.tensors["table"], table) and loaded.row_version is None
        # 1: whole; 2-3: 100-200 rows changed since it; 4: 300 rows > 250, whole again; 5: 100 since 4.
        assert deps == [[], ["step-0000000001"], ["step-0000000001"], [], ["step-0000000004"]]
        assert sizes[1] < sizes[0] / 4 and sizes[2] < sizes[0] / 2 and sizes[3] == sizes[0]
        # keep=2 (5, 4) plus the two newest whole ones (4, 1); 2 and 3 are gone.
        assert [p.name for p in store.checkpoints()] == ["step-0000000005", "step-0000000004", "step-0000000001"]

    def test_a_table_loaded_again_starts_whole(self, tmp_path: Path) -> None:
        store = CheckpointStore(tmp_path, keep=3)
        table, changes = torch.zeros(self.N, 8), RowChanges(self.N)
        self.save_rows(store, 1, table, changes)
        changes.restart()  # what a load from a checkpoint or a peer does
        self.touch(table, changes, [3], 1.0)
        assert CheckpointStore.depends_on(self.save_rows(store, 2, table, changes)) == []
        self.touch(table, changes, [4], 1.0)
        assert CheckpointStore.depends_on(self.save_rows(store, 3, table, changes)) == ["step-0000000002"]

    def test_a_corrupt_base_falls_back_to_a_whole_checkpoint(self, tmp_path: Path) -> None:
        store = CheckpointStore(tmp_path, keep=1)
        table, changes = torch.zeros(self.N, 8), RowChanges(self.N)
        for step, rows in ((1, range(0, 300)), (2, range(300, 600)), (3, range(600, 700))):
            self.touch(table, changes, list(rows), float(step))
            self.save_rows(store, step, table, changes)
        assert CheckpointStore.depends_on(tmp_path / "step-0000000003") == ["step-0000000002"]
        base = tmp_path / "step-0000000002" / "train_state.safetensors"
        data = bytearray(base.read_bytes())
        data[-5] ^= 0xFF
        base.write_bytes(bytes(data))
        ck = store.load_latest()
        assert ck is not None and ck.path.name == "step-0000000001"
        assert float(ck.state["rows"].tensors["table"][0, 0]) == 1.0

    def test_a_delta_of_another_lineage_is_refused(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        """Two machines each write a whole table at step 1 and its changed rows after; one
        machine's delta copied into the other's folder names a base "step-0000000001" that is
        not the one it was written against: refused, and the miner falls back to its own."""
        here, there = CheckpointStore(tmp_path / "a", keep=3), CheckpointStore(tmp_path / "b", keep=3)
        for store, value in ((here, 1.0), (there, 9.0)):
            table, changes = torch.full((self.N, 8), value), RowChanges(self.N)
            self.save_rows(store, 1, table, changes)
            self.touch(table, changes, [5], value + 1)
            self.save_rows(store, 2 if store is here else 3, table, changes)
        shutil.copytree(tmp_path / "b" / "step-0000000003", tmp_path / "a" / "step-0000000003")
        with pytest.raises(CheckpointCorrupt, match="another lineage"):
            here.load(tmp_path / "a" / "step-0000000003")
        ck = here.load_latest()
        assert ck is not None and ck.path.name == "step-0000000002"
        rows = ck.state["rows"].tensors["table"]
        assert float(rows[0, 0]) == 1.0 and float(rows[5, 0]) == 2.0  # its own history only

    def test_a_delta_without_its_bases_digest_is_refused(self, tmp_path: Path) -> None:
        store = CheckpointStore(tmp_path, keep=3)
        table, changes = torch.zeros(self.N, 8), RowChanges(self.N)
        self.save_rows(store, 1, table, changes)
        self.touch(table, changes, [5], 2.0)
        path = self.save_rows(store, 2, table, changes)
        skeleton_path = path / "train_state.json"
        skeleton = json.loads(skeleton_path.read_text())
        del skeleton["tree"]["__dict__"][0][1]["__rows__"]["base"]["digest"]
        skeleton_path.write_text(json.dumps(skeleton))
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["files"]["train_state.json"] = {"size": skeleton_path.stat().st_size,
                                                 "sha256": hashlib.sha256(skeleton_path.read_bytes()).hexdigest()}
        (path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(CheckpointCorrupt, match="another lineage"):
            store.load(path)

    @pytest.mark.parametrize("tamper", ["ids out of range", "base not listed", "a path as base"])
    def test_tampered_deltas_are_refused(self, tmp_path: Path, tamper: str) -> None:
        store = CheckpointStore(tmp_path, keep=3)
        table, changes = torch.zeros(self.N, 8), RowChanges(self.N)
        self.save_rows(store, 1, table, changes)
        self.touch(table, changes, [5], 2.0)
        path = self.save_rows(store, 2, table, changes)
        skeleton_path, manifest_path = path / "train_state.json", path / "manifest.json"
        skeleton, manifest = json.loads(skeleton_path.read_text()), json.loads(manifest_path.read_text())
        node = skeleton["tree"]["__dict__"][0][1]["__rows__"]
        if tamper == "ids out of range":
            from safetensors.torch import load_file, save_file
            tensors = load_file(str(path / "train_state.safetensors"))
            tensors[node["ids"]] = torch.tensor([self.N + 7])
            save_file(tensors, str(path / "train_state.safetensors"))
        elif tamper == "base not listed":
            manifest.pop("depends_on")
        else:
            manifest["depends_on"] = ["../step-0000000001"]
        manifest_path.write_text(json.dumps(manifest))
        # The manifest re-signed to match, as a forger would: only the content checks remain.
        for name in manifest["files"]:
            manifest["files"][name] = {"size": (path / name).stat().st_size,
                                       "sha256": hashlib.sha256((path / name).read_bytes()).hexdigest()}
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(CheckpointCorrupt):
            store.load(path)
        ck = store.load_latest()
        assert ck is not None and ck.path.name == "step-0000000001"
