"""Chunk layout, initial values, and the generations of chunk files and manifests.

The on-disk half of :class:`~daemon.tasks.twotower.embeddings.store.EmbeddingStore` in disk
mode: which file holds a chunk at a generation, committing a generation
(directory fsync, then ``manifest-g<gen>.json``), pinning checkpoint
generations, and reopening a directory at the newest or a pinned generation
while removing what a crash left behind. It knows nothing of the memory tiers;
the byte format of one file is :mod:`daemon.tasks.twotower.embeddings.chunkfile`. Kept apart
from the cache so the crash-safety rules read in one place; the guarantees are
in the :mod:`daemon.tasks.twotower.embeddings.store` docstring.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

import daemon.tasks.twotower.embeddings.chunkfile as chunkfile
from daemon import atomic
from daemon.tasks.twotower.embeddings.chunkfile import EmbeddingStoreCorrupt


class ChunkGenerations:
    """Chunk layout, initial values and generation files; a base of ``EmbeddingStore``,
    whose ``__init__`` sets the attributes declared here."""

    num_rows: int
    embedding_dim: int
    chunk_size: int
    num_chunks: int
    keep_checkpoints: int
    _init: Literal["normal", "zeros"]
    _init_std: float
    _seed: int
    _ids_digest: str
    dir: Path | None
    generation: int  # the committed generation (-1 before the first commit)
    _pending: int  # the generation the next writes and commit use
    _file_gen: np.ndarray  # per chunk: generation of its current file, -1 if never written
    _superseded: list[tuple[int, int]]  # (chunk, generation) files to delete after the next commit
    _uncommitted: bool
    _pins: dict[int, np.ndarray]  # pinned generation -> its chunk list

    # ------------------------------------------------------------------ chunk layout and init

    def _chunk_range(self, c: int) -> tuple[int, int]:
        lo = c * self.chunk_size
        return lo, min(lo + self.chunk_size, self.num_rows)

    def _init_chunk(self, c: int, out: np.ndarray) -> None:
        if self._init == "zeros":
            out.fill(0.0)
        else:
            rng = np.random.default_rng([self._seed, c])
            rng.standard_normal(out.shape, dtype=np.float32, out=out)
            out *= np.float32(self._init_std)

    # ------------------------------------------------------------------ disk: files and generations

    def _chunk_path(self, c: int, g: int) -> Path:
        assert self.dir is not None
        return self.dir / chunkfile.chunk_name(c, g)

    def _commit(self) -> None:
        """Make the pending generation the current one: directory fsync, then the manifest."""
        assert self.dir is not None
        atomic.fsync_dir(self.dir)
        p = self._pending
        chunkfile.write_json(self.dir / chunkfile.manifest_name(p), self._manifest(p))
        previous = self.generation
        self.generation = p
        self._pending = p + 1
        self._uncommitted = False
        if previous >= 0 and previous not in self._pins:
            self._unlink(self.dir / chunkfile.manifest_name(previous))
        superseded, self._superseded = self._superseded, []
        for c, g in superseded:
            if not any(pinned[c] == g for pinned in self._pins.values()):
                self._unlink(self._chunk_path(c, g))

    def _manifest(self, g: int) -> dict[str, Any]:
        return {
            "format": chunkfile.FORMAT_VERSION,
            "generation": g,
            "num_rows": self.num_rows,
            "dim": self.embedding_dim,
            "chunk_size": self.chunk_size,
            "init": self._init,
            "init_std": self._init_std,
            "seed": self._seed,
            "sample_ids_digest": self._ids_digest,
            "chunks": self._file_gen.tolist(),
        }

    def _pin(self, g: int) -> None:
        assert self.dir is not None
        if g not in self._pins:
            self._pins[g] = self._file_gen.copy()
        while len(self._pins) > self.keep_checkpoints:
            old = min(self._pins)
            arr = self._pins.pop(old)
            if old != self.generation:
                self._unlink(self.dir / chunkfile.manifest_name(old))
            for c in np.flatnonzero((arr >= 0) & (arr != self._file_gen)).tolist():
                if not any(p[c] == arr[c] for p in self._pins.values()):
                    self._unlink(self._chunk_path(c, int(arr[c])))
        chunkfile.write_json(self.dir / chunkfile.PINS_NAME, {"pinned": sorted(self._pins)})

    @staticmethod
    def _unlink(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def _read_manifest(self, g: int) -> np.ndarray:
        assert self.dir is not None
        path = self.dir / chunkfile.manifest_name(g)
        m = chunkfile.read_json(path)
        want = {"num_rows": self.num_rows, "dim": self.embedding_dim, "chunk_size": self.chunk_size}
        got = {k: m.get(k) for k in want}
        if got != want:
            raise ValueError(f"embedding store {self.dir} was created with {got}, asked for {want}")
        if m.get("sample_ids_digest", "") != self._ids_digest:
            raise ValueError(f"embedding store {self.dir} was created for different sample_ids")
        chunks = m.get("chunks")
        if not isinstance(chunks, list) or len(chunks) != self.num_chunks:
            raise EmbeddingStoreCorrupt(f"embedding store file {path} has a bad chunk list")
        # the manifest's init wins: rows never written must come back as they were
        self._init, self._init_std, self._seed = m["init"], float(m["init_std"]), int(m["seed"])
        return np.asarray(chunks, np.int64)

    def _open_dir(self, generation: int | None) -> None:
        """Open the newest (or the requested, pinned) generation, check its files, and
        remove what no kept manifest names (temp files and uncommitted chunks of a crash)."""
        d = self.dir
        assert d is not None
        d.mkdir(parents=True, exist_ok=True)
        names = os.listdir(d)
        manifests = sorted(int(m.group(1)) for n in names if (m := chunkfile.MANIFEST_RE.match(n)) is not None)
        max_gen = max(
            [*manifests, *(int(m.group(2)) for n in names if (m := chunkfile.CHUNK_RE.match(n)))],
            default=-1,
        )
        self._superseded = []
        self._uncommitted = False
        self._pins = {}
        self._pending = max_gen + 1
        if not manifests:
            if generation is not None:
                raise ValueError(f"embedding store {d} has no generation {generation}: it is empty")
            self._file_gen = np.full(self.num_chunks, -1, np.int64)
            self.generation = -1
            self._commit()
        else:
            target = manifests[-1] if generation is None else generation
            if target not in manifests:
                raise ValueError(f"embedding store {d} has no generation {target} (has {manifests})")
            self._file_gen = self._read_manifest(target)
            self.generation = target
            pins_path = d / chunkfile.PINS_NAME
            if pins_path.exists():
                for g in chunkfile.read_json(pins_path).get("pinned", []):
                    if int(g) in manifests:
                        self._pins[int(g)] = self._file_gen.copy() if g == target else self._read_manifest_quiet(int(g))
            if target != manifests[-1]:
                # Restoring an older generation: commit it again as the newest, so a plain
                # reopen after a crash also comes back to it.
                self._commit()
        for c in np.flatnonzero(self._file_gen >= 0).tolist():
            lo, hi = self._chunk_range(c)
            chunkfile.check_size(self._chunk_path(c, int(self._file_gen[c])), hi - lo, self.embedding_dim)
        keep_manifests = {chunkfile.manifest_name(g) for g in {self.generation, *self._pins}}
        keep_chunks = {
            chunkfile.chunk_name(c, int(arr[c]))
            for arr in (self._file_gen, *self._pins.values())
            for c in np.flatnonzero(arr >= 0).tolist()
        }
        for n in os.listdir(d):
            stale_manifest = chunkfile.MANIFEST_RE.match(n) and n not in keep_manifests
            stale_chunk = chunkfile.CHUNK_RE.match(n) and n not in keep_chunks
            temp = n.startswith(".") and n.endswith(".tmp")
            if stale_manifest or stale_chunk or temp:
                self._unlink(d / n)

    def _read_manifest_quiet(self, g: int) -> np.ndarray:
        """A pinned manifest's chunk list, without touching this store's init settings."""
        saved = (self._init, self._init_std, self._seed)
        try:
            return self._read_manifest(g)
        finally:
            self._init, self._init_std, self._seed = saved
