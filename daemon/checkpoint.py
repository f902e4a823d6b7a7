"""Local checkpoints that survive kill -9.

A checkpoint is a directory ``step-<global step>``: ``model.safetensors``, the
training state (optimizers, counters, data position, RNG states) as
``train_state.safetensors`` plus ``train_state.json`` (``statefile.py``: nothing
in a checkpoint runs code when read), and ``manifest.json`` with the size and
sha256 of each file. It is written
whole under a temporary name, every file fsynced, then renamed into place:
a reader (the next start) sees a complete checkpoint or none. Loading
verifies the manifest, which must list exactly the files of a checkpoint; a
truncated, corrupt or malformed checkpoint is reported in one line and the
previous one is used. Checkpoints of earlier versions (``train_state.pt``) are
still read, with torch's weights-only loader.

A sharded model's checkpoint (``train.sharding=fsdp``) holds, instead of
``model.safetensors``, a folder ``shards/`` that every rank writes its slices of the
weights, the optimizer and the outer state into (``daemon/engine/sharded.py``); rank 0
writes the rest of the training state and then the manifest, which lists every file of
the folder, and renames the whole into place only after all ranks are done. Its manifest
says ``"format": "sharded"``.

Row tables (``daemon/rowtable.py``: the ID embeddings and their per-row optimizer
state) are written in full in one checkpoint, the base, and as the rows changed
since then in the following ones, until a quarter of the rows have changed. A
checkpoint written that way names its base in ``depends_on``; loading it verifies
the base too, and pruning never removes a base that a kept checkpoint needs. The
two newest self-contained checkpoints are always kept besides the newest ``keep``,
so a base found corrupt still leaves an older whole checkpoint to fall back to.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from daemon import atomic, statefile
from daemon.disk import save_safetensors
from daemon.rowtable import RowTable
from daemon.statefile import RowBase
from daemon.tensors import aliases, with_aliases

log = structlog.get_logger(__name__)

MODEL_FILE = "model.safetensors"
STATE_TENSORS = "train_state.safetensors"
STATE_SKELETON = "train_state.json"
LEGACY_STATE_FILE = "train_state.pt"  # written by minerd 0.1
FILE_SETS = (
    frozenset({MODEL_FILE, STATE_TENSORS, STATE_SKELETON}),
    frozenset({MODEL_FILE, LEGACY_STATE_FILE}),
)
SHARDS_DIR = "shards"
SHARDED = "sharded"
# What torch.distributed.checkpoint writes: its metadata and one file per rank.
SHARD_FILE = re.compile(r"shards/(\.metadata|__[0-9]+_[0-9]+\.distcp)")
MANIFEST = "manifest.json"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
NAME = re.compile(r"step-[0-9]{10}")
# A row table is written whole again once this share of its rows changed since its base:
# past it a delta costs as much to write, and to read back, as a quarter of the table.
DELTA_MAX_FRACTION = 0.25
KEEP_SELF_CONTAINED = 2


class CheckpointCorrupt(Exception):
    pass


@dataclass
class Checkpoint:
    path: Path
    model: dict[str, torch.Tensor]  # empty for a sharded checkpoint: its weights are in shards/
    state: dict[str, Any]
    meta: dict[str, Any]

    @property
    def sharded(self) -> bool:
        return self.meta.get("format") == SHARDED

    @property
    def shards(self) -> Path:
        return self.path / SHARDS_DIR


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    def __init__(self, root: Path, keep: int) -> None:
        self.root = root
        self.keep = keep
        self._bases: dict[str, RowBase] = {}  # where a row table sits in the state -> its base

    def prepare(self) -> None:
        """Create the directory and clear what a killed save left behind."""
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(f"{TMP_PREFIX}*"):
            log.info("removing an unfinished checkpoint left by a killed process", path=str(leftover))
            shutil.rmtree(leftover, ignore_errors=True)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, newest first."""
        found = []
        for p in self.root.glob(f"{PREFIX}*"):
            try:
                found.append((int(p.name[len(PREFIX) :]), p))
            except ValueError:
                continue
        return [p for _, p in sorted(found, reverse=True)]

    def save(
        self, global_step: int, model: dict[str, torch.Tensor], state: dict[str, Any], meta: dict[str, Any]
    ) -> Path:
        final = self.root / f"{PREFIX}{global_step:010d}"
        if final.exists():
            return final  # this step is already saved (a stop right after a periodic save)
        tmp = self.root / f"{TMP_PREFIX}{PREFIX}{global_step:010d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            tied = aliases(model)  # found before the copy to the host, which would untie them
            tensors = {k: v.detach().cpu().contiguous() for k, v in model.items() if k not in tied}
            save_safetensors(tensors, tmp / MODEL_FILE, metadata={"aliases": json.dumps(tied, sort_keys=True)})
            used: set[str] = set()
            written: dict[str, RowBase] = {}
            statefile.save(state, tmp / STATE_TENSORS, tmp / STATE_SKELETON,
                           lambda where, table: self._choose_base(where, table, used), written)
            files = {}
            for name in (MODEL_FILE, STATE_TENSORS, STATE_SKELETON):
                _fsync_file(tmp / name)
                files[name] = {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
            manifest = {"global_step": global_step, "created_at": time.time(), "files": files, **meta}
            if used:
                manifest["depends_on"] = sorted(used)
            atomic.write_json(tmp / MANIFEST, manifest)
            os.replace(tmp, final)
            atomic.fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for where, base in written.items():  # only now: a failed save is no base
            self._bases[where] = replace(base, checkpoint=final.name, digest=str(files[STATE_TENSORS]["sha256"]))
        self._prune()
        return final

    def save_sharded(self, global_step: int, write_shards: Callable[[Path], None], state: dict[str, Any],
                     meta: dict[str, Any], is_main: bool, barrier: Callable[[], None]) -> Path:
        """Every rank calls it: ``write_shards`` (a collective) writes each rank's slices into the
        temporary folder; then rank 0 writes ``state`` (the rest of the training state), the
        manifest, and renames the folder into place. A kill at any point leaves the previous
        checkpoint as it was (the temporary folder is removed at the next start)."""
        final = self.root / f"{PREFIX}{global_step:010d}"
        if final.exists():  # every rank sees the same folder: all of them skip it alike
            return final
        tmp = self.root / f"{TMP_PREFIX}{PREFIX}{global_step:010d}-sharded"
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / SHARDS_DIR).mkdir(parents=True)
        barrier()  # the folder exists before any rank writes into it
        try:
            write_shards(tmp / SHARDS_DIR)
            if is_main:
                statefile.save(state, tmp / STATE_TENSORS, tmp / STATE_SKELETON, lambda where, table: None, {})
                names = sorted(f"{SHARDS_DIR}/{f.name}" for f in (tmp / SHARDS_DIR).iterdir())
                files = {}
                for name in (*names, STATE_TENSORS, STATE_SKELETON):
                    _fsync_file(tmp / name)
                    files[name] = {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                atomic.fsync_dir(tmp / SHARDS_DIR)
                manifest = {"global_step": global_step, "created_at": time.time(), "format": SHARDED, "files": files,
                            **meta}
                atomic.write_json(tmp / MANIFEST, manifest)
                os.replace(tmp, final)
                atomic.fsync_dir(self.root)
                self._prune()
        except BaseException:
            if is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        barrier()  # no rank goes on (to the next save, or to exit) before the checkpoint is in place
        return final

    def _choose_base(self, where: str, table: RowTable, used: set[str]) -> RowBase | None:
        """The base to write ``table`` against: one written from the same lineage, still on
        disk, of which at most ``DELTA_MAX_FRACTION`` of the rows have changed."""
        base = self._bases.get(where)
        if (base is None or base.lineage != table.lineage or table.row_version is None
                or set(base.keys) != set(table.tensors) or not (self.root / base.checkpoint).is_dir()):
            return None
        if int((table.row_version > base.version).sum()) > DELTA_MAX_FRACTION * table.num_rows:
            return None
        used.add(base.checkpoint)
        return base

    @staticmethod
    def depends_on(path: Path) -> list[str]:
        """The checkpoints ``path`` needs (its bases); none when its manifest is unreadable."""
        try:
            deps = json.loads((path / MANIFEST).read_text()).get("depends_on", [])
        except (OSError, ValueError, AttributeError):
            return []
        return [d for d in deps if isinstance(d, str) and NAME.fullmatch(d)] if isinstance(deps, list) else []

    def _prune(self) -> None:
        found = self.checkpoints()
        deps = {p.name: self.depends_on(p) for p in found}
        kept = {p.name for p in found[: self.keep]}
        for p in found[: self.keep]:
            kept.update(deps[p.name])
        kept.update([p.name for p in found if not deps[p.name]][:KEEP_SELF_CONTAINED])
        for old in found:
            if old.name not in kept:
                remove(old)

    def verify(self, path: Path) -> dict[str, Any]:
        """The manifest of a complete, uncorrupted checkpoint, or CheckpointCorrupt."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointCorrupt(f"{path / MANIFEST}: unreadable manifest ({exc})") from None
        # Every file checked, none skipped: a manifest listing fewer would wave corrupt weights through.
        if manifest.get("format") == SHARDED:
            if not _sharded_files(files):
                shown = sorted(files) if isinstance(files, dict) else type(files).__name__
                raise CheckpointCorrupt(f"{path / MANIFEST}: does not list the files of a sharded checkpoint "
                                        f"(got {shown})")
        elif not isinstance(files, dict) or frozenset(files) not in FILE_SETS:
            shown = sorted(files) if isinstance(files, dict) else type(files).__name__
            raise CheckpointCorrupt(f"{path / MANIFEST}: does not list the files of a checkpoint (got {shown})")
        for name, want in files.items():
            if not (isinstance(want, dict) and isinstance(want.get("size"), int)
                    and isinstance(want.get("sha256"), str)):
                raise CheckpointCorrupt(f"{path / MANIFEST}: the entry of {name} lacks size or sha256")
            f = path / name
            try:
                size = f.stat().st_size
            except OSError:
                raise CheckpointCorrupt(f"{f}: missing") from None
            if size != want["size"]:
                raise CheckpointCorrupt(f"{f}: truncated ({size} bytes, expected {want['size']})")
            if sha256_file(f) != want["sha256"]:
                raise CheckpointCorrupt(f"{f}: checksum mismatch")
        deps = manifest.get("depends_on", [])
        if not (isinstance(deps, list) and all(isinstance(d, str) and NAME.fullmatch(d) and d != path.name
                                               for d in deps)):
            raise CheckpointCorrupt(f"{path / MANIFEST}: depends_on is not a list of other checkpoints' names")
        return dict(manifest)

    def load(self, path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
        meta = self.verify(path)
        bases = {}
        for dep in meta.get("depends_on", []):
            try:
                bases[dep] = self.verify(self.root / dep)
            except CheckpointCorrupt as exc:
                raise CheckpointCorrupt(f"{path}: its base {dep} is unusable ({exc})") from None

        def base_tensor(name: str, key: str, digest: str) -> torch.Tensor:
            if name not in meta.get("depends_on", []):
                raise ValueError(f"a row table refers to {name}, which the manifest does not list")
            # The base verified above is this one, not another history's checkpoint of the same
            # name (one copied from another machine would mix both tables, silently).
            if digest != bases[name]["files"][STATE_TENSORS]["sha256"]:
                raise ValueError(f"a row table was written against another {name} (another lineage)")
            with safe_open(str(self.root / name / STATE_TENSORS), framework="pt", device=str(map_location)) as fh:
                return fh.get_tensor(key)

        if meta.get("format") == SHARDED:
            # The weights and optimizer are read into the live model (daemon/engine/sharded.py).
            try:
                state = statefile.load(path / STATE_TENSORS, path / STATE_SKELETON, map_location, base_tensor)
            except Exception as exc:
                raise CheckpointCorrupt(f"{path}: cannot load ({type(exc).__name__}: {exc})") from None
            return Checkpoint(path, {}, state, meta)
        try:
            model = load_file(str(path / MODEL_FILE), device=str(map_location))
            with safe_open(str(path / MODEL_FILE), framework="pt") as fh:
                tied = json.loads((fh.metadata() or {}).get("aliases", "{}"))
            model = with_aliases(model, tied)
            if STATE_SKELETON in meta["files"]:
                state = statefile.load(path / STATE_TENSORS, path / STATE_SKELETON, map_location, base_tensor)
            else:
                state = torch.load(path / LEGACY_STATE_FILE, map_location=map_location, weights_only=True)
            if not isinstance(state, dict):
                raise ValueError(f"the training state is a {type(state).__name__}, not a mapping")
        except Exception as exc:
            raise CheckpointCorrupt(f"{path}: cannot load ({type(exc).__name__}: {exc})") from None
        return Checkpoint(path, model, state, meta)

    def load_latest(self, map_location: str | torch.device = "cpu") -> Checkpoint | None:
        """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
        for path in self.checkpoints():
            try:
                return self.load(path, map_location)
            except CheckpointCorrupt as exc:
                log.error(f"checkpoint corrupt, using the previous one: {exc}", path=str(path))
        return None


def remove(path: Path) -> None:
    """Delete a checkpoint so that no reader sees it half deleted: renamed out of the checkpoints'
    names first (one atomic step), then removed. A kill during the removal leaves a temporary
    folder, which the next start clears, never a ``step-*`` missing some of its files."""
    doomed = path.with_name(f"{TMP_PREFIX}removed-{path.name}-{os.getpid()}")
    try:
        os.replace(path, doomed)
        atomic.fsync_dir(path.parent)  # the rename reaches the disk before any file goes
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _sharded_files(files: Any) -> bool:
    """The files of a sharded checkpoint: the training state, the shards' metadata and at least
    one rank's file, nothing else (no path that leaves the checkpoint)."""
    if not isinstance(files, dict) or not {STATE_TENSORS, STATE_SKELETON, f"{SHARDS_DIR}/.metadata"} <= set(files):
        return False
    shards = [n for n in files if n not in (STATE_TENSORS, STATE_SKELETON)]
    return all(isinstance(n, str) and SHARD_FILE.fullmatch(n) for n in shards) and len(shards) >= 2
