"""A revision: what is snapshotted on the training thread and what is written (how a
validator reads it back: verify.py).

Layout of a target::

    LATEST                      "rev-<outer>-<inner>\\n", written last
    rev-<outer>-<inner>/
        model.safetensors       and whatever else the task's layout writes
                                (config.json, tokenizer files: layout.py); weights of more
                                than upload.shard_bytes as model-0000k-of-0000n.safetensors
                                and model.safetensors.index.json instead
        optimizer.pt            torch.save of the optimizer state dict
        pseudo_gradient.*       with upload.artifact pseudo_gradient or both: the
                                compressed pseudo-gradient (daemon/compression/artifact.py),
                                its tensors split the same way above upload.shard_bytes;
                                with pseudo_gradient alone, no weights and no optimizer
        metadata.json           the manifest, written after the files it names
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

import torch

from daemon import atomic
from daemon.compression import CodecSpec, CompressionStats, artifact, encode
from daemon.tensors import aliases
from daemon.upload.layout import OPTIMIZER_FILE, RevisionLayout, WeightsLayout

# How a validator reads a revision back lives in verify.py; the publisher and the bundle
# read these names from here.
from daemon.upload.verify import read_manifest as read_manifest
from daemon.upload.verify import read_pointer as read_pointer
from daemon.upload.verify import verify as verify

FORMAT = 1


@dataclass
class Snapshot:
    """CPU copies of one step's state, owned by the publisher until it is done."""

    outer_step: int
    inner_step: int
    loss: float
    model: dict[str, torch.Tensor] | None  # tied weights appear once (under their first key)
    optimizer: dict[str, Any] | None
    # Weights at the start of the outer round minus weights now, per parameter name.
    pseudo_gradient: dict[str, torch.Tensor] | None = None
    # Set when copies from an accelerator were queued without waiting: the
    # publisher synchronises on it, the training thread never does.
    ready: Any = None
    taken_at: float = field(default_factory=time.time)
    # What the revision was trained on (the task's data record), for a validator to replay.
    data: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return f"rev-{self.outer_step}-{self.inner_step}"


class SnapshotBuffers:
    """Reused CPU buffers for snapshots.

    The gate allows one upload in flight, so one set of buffers suffices and is
    reused: after the first upload a snapshot is a plain memcpy into memory that
    is already paged in, with no allocation. From CUDA the buffers are pinned
    and the copies queued on the current stream (they see the state as of this
    step; later kernels on the stream run after them), then an event is
    recorded; the publisher waits on it.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}
        self._cuda = False

    def _copy(self, key: str, t: torch.Tensor) -> torch.Tensor:
        src = t.detach()
        buf = self._bufs.get(key)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            pin = src.is_cuda
            buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=pin)
            self._bufs[key] = buf
        if src.is_cuda:
            self._cuda = True
            buf.copy_(src, non_blocking=True)
        else:
            buf.copy_(src)
        return buf

    def _copy_tree(self, prefix: str, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._copy(prefix, obj)
        if isinstance(obj, dict):
            return {k: self._copy_tree(f"{prefix}.{k}", v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(self._copy_tree(f"{prefix}.{i}", v) for i, v in enumerate(obj))
        return obj

    def capture(
        self,
        outer_step: int,
        inner_step: int,
        loss: float,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        anchor: Sequence[torch.Tensor] | None = None,
        weights: bool = True,
    ) -> Snapshot:
        """``anchor``: the outer round's starting weights, in ``model.parameters()`` order; with
        it the snapshot holds the pseudo-gradient (``anchor - parameters``) too."""
        self._cuda = False
        copied = None
        if weights:
            state = model.state_dict()
            tied = aliases(state)
            copied = {k: self._copy(f"m.{k}", v) for k, v in state.items() if k not in tied}
        optim = self._copy_tree("o", optimizer.state_dict()) if optimizer is not None else None
        pseudo = None
        if anchor is not None:
            with torch.no_grad():
                pseudo = {n: self._copy(f"g.{n}", a - p.detach())
                          for (n, p), a in zip(model.named_parameters(), anchor, strict=True)}
        ready = None
        if self._cuda:
            ready = torch.cuda.Event()
            ready.record()
        return Snapshot(outer_step, inner_step, loss, copied, optim, pseudo, ready)


def params_finite(params: Iterable[torch.Tensor]) -> bool:
    """Any NaN or inf makes a tensor's sum non-finite, and a sum is one streaming
    pass (isfinite().all() allocates a mask per tensor and took 3x as long on a
    67 MB model). A finite model whose sum overflows is reported non-finite too;
    weights that large are broken anyway. One host sync at the end."""
    sums = [p.detach().sum() for p in params if p.is_floating_point() or p.is_complex()]
    if not sums:
        return True
    if len({s.device for s in sums}) > 1:
        sums = [s.to(sums[0].device) for s in sums]
    return bool(torch.isfinite(torch.stack(sums)).all())


class _HashingWriter:
    """A file object for torch.save that hashes what passes through, so the
    optimizer state is not read back just to compute its sha256."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        self._sha.update(data)
        self.size += memoryview(data).nbytes
        return self._fh.write(data)

    def flush(self) -> None:
        self._fh.flush()

    def entry(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self._sha.hexdigest()}


def _file_entry(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        h = hashlib.file_digest(fh, "sha256")
        return {"size": fh.tell(), "sha256": h.hexdigest()}


def write_revision(
    snap: Snapshot, folder: Path, version: str, config_hash: str, layout: RevisionLayout | None = None,
    codec: CodecSpec | None = None, stats: CompressionStats | None = None, shard_bytes: int | None = None,
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Serialise a snapshot into ``folder``; return its files and its manifest. With ``codec``
    the snapshot's pseudo-gradient is encoded here, on the publisher thread. Weights (and the
    pseudo-gradient's tensors) of more than ``shard_bytes`` are split into shards with an index
    (``upload.shard_bytes``; None: one file each, whatever the size)."""
    if snap.ready is not None:
        snap.ready.synchronize()
    folder.mkdir(parents=True, exist_ok=True)
    lay = layout or WeightsLayout()
    if snap.model is not None:
        names = lay.write(snap.model, folder, shard_bytes)
    else:
        pg = snap.pseudo_gradient or {}
        names = lay.describe({n: list(t.shape) for n, t in pg.items()}, folder)
    if snap.pseudo_gradient is not None and codec is not None:
        t0 = time.perf_counter()
        enc = encode(snap.pseudo_gradient, codec)
        encode_s = time.perf_counter() - t0
        names += artifact.write(enc, folder, shard_bytes=shard_bytes, outer_step=snap.outer_step,
                                inner_steps=snap.inner_step)
        if stats is not None:
            dense = sum(t.numel() * 4 for t in snap.pseudo_gradient.values())
            stats.record("upload", enc.nbytes, dense, encode_s, 0.0)
    files = {name: folder / name for name in names}
    entries = {name: _file_entry(path) for name, path in files.items()}
    if snap.optimizer is not None:
        files[OPTIMIZER_FILE] = folder / OPTIMIZER_FILE
        with atomic.atomic_open(files[OPTIMIZER_FILE], "wb") as fh:
            writer = _HashingWriter(fh)
            # torch.save only calls write() and flush() on a buffer.
            torch.save(snap.optimizer, cast(IO[bytes], writer))
        entries[OPTIMIZER_FILE] = writer.entry()
    manifest = {
        "format": FORMAT,
        "revision": snap.name,
        "outer_step": snap.outer_step,
        "inner_step": snap.inner_step,
        "loss": snap.loss,
        "created_at": datetime.fromtimestamp(snap.taken_at, UTC).isoformat(),
        "created_at_unix": snap.taken_at,
        "minerd_version": version,
        "config_hash": config_hash,
        "artifact": _artifact_kind(snap.model is not None, artifact.HEADER_FILE in entries),
        "files": entries,
    }
    if snap.data is not None:
        manifest["data"] = snap.data
    return files, manifest


def _artifact_kind(weights: bool, pseudo_gradient: bool) -> str:
    return "both" if weights and pseudo_gradient else "pseudo_gradient" if pseudo_gradient else "weights"


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
