"""On-disk format of one embedding chunk, and of the manifest that names them.

A chunk file is ``header | payload | footer``:

- header (40 bytes): magic ``MNEMBCH1``, format version, dim, chunk index,
  generation, number of rows;
- payload: ``rows x dim`` little-endian float32, row-major;
- footer (16 bytes): magic ``MNEMEND1``, CRC-32 of header + payload, 4 zero bytes.

The size alone tells a truncated file (checked when a store opens); the CRC
tells a corrupt one (checked on every read). Either raises
:class:`EmbeddingStoreCorrupt` naming the file. A chunk file is written to a
temp name, fsynced and renamed, so a crash leaves the old file or the new one,
never a mix; its name carries the generation, so a file is never rewritten
once a committed manifest names it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from daemon import atomic
from daemon.errors import CorruptState

FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIqqq")
_FOOTER = struct.Struct("<8sI4x")
_MAGIC = b"MNEMBCH1"
_MAGIC_END = b"MNEMEND1"
HEADER_SIZE = _HEADER.size
FOOTER_SIZE = _FOOTER.size

CHUNK_RE = re.compile(r"^chunk-(\d{6,})-g(\d{8,})\.emb$")
MANIFEST_RE = re.compile(r"^manifest-g(\d{8,})\.json$")
PINS_NAME = "pins.json"


class EmbeddingStoreCorrupt(CorruptState):
    """A chunk file or manifest on disk is truncated, corrupt or missing."""

    remedy = ("restore the state directory from a backup, or remove its embeddings/ and checkpoints/ folders "
              "to train the ID embeddings afresh")


def chunk_name(index: int, generation: int) -> str:
    return f"chunk-{index:06d}-g{generation:08d}.emb"


def manifest_name(generation: int) -> str:
    return f"manifest-g{generation:08d}.json"


def chunk_file_size(rows: int, dim: int) -> int:
    return HEADER_SIZE + rows * dim * 4 + FOOTER_SIZE


def write_chunk(path: Path, index: int, generation: int, rows: np.ndarray) -> None:
    """Write ``rows`` (float32 [n, dim], C-contiguous) atomically; no directory
    fsync here: the caller fsyncs the directory once before committing a manifest."""
    header = _HEADER.pack(_MAGIC, FORMAT_VERSION, rows.shape[1], index, generation, rows.shape[0])
    payload = rows.data.cast("B")
    crc = zlib.crc32(payload, zlib.crc32(header))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(header)
            fh.write(payload)
            fh.write(_FOOTER.pack(_MAGIC_END, crc))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_size(path: Path, rows: int, dim: int) -> None:
    """Cheap open-time check: the file exists and has exactly the expected size."""
    expected = chunk_file_size(rows, dim)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise EmbeddingStoreCorrupt(f"embedding chunk file {path} is missing") from None
    if size != expected:
        raise EmbeddingStoreCorrupt(
            f"embedding chunk file {path} is truncated or corrupt: {size} bytes, expected {expected}"
        )


def read_chunk_into(path: Path, index: int, generation: int, out: np.ndarray) -> None:
    """Read a chunk file into ``out`` (float32 [rows, dim], C-contiguous) and verify it."""
    rows, dim = out.shape

    def corrupt(why: str) -> EmbeddingStoreCorrupt:
        return EmbeddingStoreCorrupt(f"embedding chunk file {path} is corrupt: {why}")

    expected = chunk_file_size(rows, dim)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below, size checked first
    except FileNotFoundError:
        raise EmbeddingStoreCorrupt(f"embedding chunk file {path} is missing") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size != expected:
            raise EmbeddingStoreCorrupt(
                f"embedding chunk file {path} is truncated or corrupt: {size} bytes, expected {expected}"
            )
        header = fh.read(HEADER_SIZE)
        magic, version, f_dim, f_index, f_gen, f_rows = _HEADER.unpack(header)
        if magic != _MAGIC or version != FORMAT_VERSION:
            raise corrupt("bad magic or format version")
        if (f_dim, f_index, f_gen, f_rows) != (dim, index, generation, rows):
            raise corrupt(
                f"header says chunk {f_index} gen {f_gen} {f_rows}x{f_dim}, "
                f"expected chunk {index} gen {generation} {rows}x{dim}"
            )
        payload = out.data.cast("B")
        if fh.readinto(payload) != len(payload):
            raise corrupt("short read")
        magic_end, crc = _FOOTER.unpack(fh.read(FOOTER_SIZE))
    if magic_end != _MAGIC_END:
        raise corrupt("bad footer")
    if zlib.crc32(payload, zlib.crc32(header)) != crc:
        raise corrupt("checksum mismatch")


def read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EmbeddingStoreCorrupt(f"embedding store file {path} is unreadable: {exc}") from exc
    if not isinstance(obj, dict):
        raise EmbeddingStoreCorrupt(f"embedding store file {path} is not a JSON object")
    return obj


def write_json(path: Path, obj: dict[str, Any]) -> None:
    atomic.write_json(path, obj)
