"""The first half of what a validator does with a target: the pointer, the manifest, and
every file's size and sha256, each file fetched once into a folder of the caller's.

Whatever comes next (loading the model, decoding the pseudo-gradient) reads that folder,
so it works on exactly the bytes that were hashed: a bucket whose objects change between
two reads cannot show the check one file and the loader another. Nothing else of the
target reaches the loader either: a file the manifest does not list (a ``modeling_*.py``
beside the weights) is never copied.

Every read is bounded before it happens (``limits.py``): the pointer, the manifest, and each
file by the size its manifest states, which must itself be under the cap for its kind.

Weights (and a pseudo-gradient's tensors) may come as shards with an index, as
``save_pretrained`` writes a large model (``daemon/tensor_files.py``). The index is what
``from_pretrained`` follows, so it is checked before anything loads (``stored_tensors``): it is
read within its own cap; it may name only shards the manifest lists, by the plain names
``<stem>-00001-of-0000N`` ... ``<stem>-0000N-of-0000N``; every shard the manifest lists must be
named; and each tensor in the shards' headers must be in exactly one shard, the one the index
maps it to. Each shard's header is checked as a single file's is, and all of them together
may take no more than one header may.
"""

from __future__ import annotations

import math
import os
import re
import stat
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon import tensor_files
from daemon.compression import artifact
from daemon.storage import MANIFEST, POINTER, Storage, StorageError, TooLarge, revision_key
from daemon.upload.layout import MODEL_FILE, MODEL_INDEX_FILE, MODEL_STEM, OPTIMIZER_FILE
from daemon.upload.limits import LIMITS, Limits, Refused, load_json, read_json

# A plain file name inside the revision folder: no path, nothing hidden.
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
SHA256 = re.compile(r"[0-9a-f]{64}")
# Bytes per element of each safetensors dtype.
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class Revision:
    """A revision whose files matched its manifest, copied into ``folder`` (all but the
    optimizer state, which was only hashed)."""

    name: str
    where: str  # "<target>: <name>", how problem lines begin
    manifest: dict[str, Any]
    folder: Path

    @property
    def files(self) -> dict[str, Any]:
        return dict(self.manifest["files"])


def read_pointer(storage: Storage, limits: Limits = LIMITS) -> str | None:
    """The revision LATEST names (stripped), None without one; TooLarge over the pointer's cap."""
    raw = storage.get_bytes(POINTER, limits.pointer_bytes)
    return None if raw is None else raw.decode("utf-8", "replace").strip()


def read_manifest(storage: Storage, name: str, limits: Limits = LIMITS) -> dict[str, Any] | None:
    """Revision ``name``'s manifest, None without one; ValueError (Refused) when it is not a
    JSON object nested within the limit, TooLarge over the manifest's cap."""
    raw = storage.get_bytes(f"{name}/{MANIFEST}", limits.manifest_bytes)
    if raw is None:
        return None
    data = load_json(raw, limits.json_depth)
    if not isinstance(data, dict):
        raise Refused("not a JSON object")
    return data


def verify(storage: Storage, limits: Limits = LIMITS) -> list[str]:
    """Pointer, manifest, sizes and checksums of the revision LATEST names; one line per problem."""
    with tempfile.TemporaryDirectory(prefix="minerd-verify-") as tmp:
        return fetch_revision(storage, Path(tmp), limits)[1]


def fetch_revision(storage: Storage, dest: Path, limits: Limits = LIMITS) -> tuple[Revision | None, list[str]]:
    """The revision LATEST names, its files fetched once into ``dest`` (an empty or new folder)
    and checked against its manifest; or None and one line per problem."""
    where = storage.describe()
    try:
        try:
            name = read_pointer(storage, limits)
        except TooLarge as exc:
            return None, [f"{where}: {POINTER}: {_held(exc)}, over the {exc.limit} a pointer may take"]
        if name is None:
            return None, [f"{where}: {POINTER}: missing"]
        key = revision_key(name)
        if key is None:
            return None, [f"{where}: {POINTER}: does not name a revision (got {name[:80]!r})"]
        mpath = f"{where}: {name}/{MANIFEST}"
        try:
            manifest = read_manifest(storage, name, limits)
        except TooLarge as exc:
            return None, [f"{mpath}: {_held(exc)}, over the {exc.limit} a manifest may take"]
        except Refused as exc:
            return None, [f"{mpath}: {exc}"]
        if manifest is None:
            return None, [f"{mpath}: missing"]
        problems = _check_manifest(storage, where, name, key, manifest, dest, limits)
    except StorageError as exc:
        return None, [f"{where}: unreadable: {exc}"]
    if problems:
        return None, problems
    return Revision(name, f"{where}: {name}", manifest, dest), []


def _held(exc: TooLarge) -> str:
    return f"{exc.size} bytes" if exc.size is not None else f"more than {exc.limit} bytes"


def _check_manifest(
    storage: Storage, where: str, name: str, key: tuple[int, int], manifest: dict[str, Any], dest: Path,
    limits: Limits,
) -> list[str]:
    problems = []
    mpath = f"{where}: {name}/{MANIFEST}"
    steps = (manifest.get("outer_step"), manifest.get("inner_step"))
    if steps != key:
        problems.append(f"{mpath}: outer/inner steps {str(steps)[:80]} do not match the revision name")
    loss = manifest.get("loss")
    if not isinstance(loss, int | float) or not math.isfinite(loss):
        problems.append(f"{mpath}: loss is not a finite number (got {repr(loss)[:40]})")
    for required in ("created_at", "minerd_version", "config_hash"):
        if required not in manifest:
            problems.append(f"{mpath}: {required} missing")
    files = manifest.get("files")
    if not isinstance(files, dict) or not ({MODEL_FILE, MODEL_INDEX_FILE, artifact.HEADER_FILE} & set(files)):
        problems.append(f"{mpath}: files lists none of {MODEL_FILE}, {MODEL_INDEX_FILE} and {artifact.HEADER_FILE}")
        return problems
    if len(files) > limits.files:
        return [*problems, f"{mpath}: lists {len(files)} files, over the {limits.files} a revision may hold"]
    sizes: dict[str, int] = {}
    for fname, entry in sorted(files.items()):
        if why := _name_problem(fname):
            problems.append(f"{mpath}: {why}")
        elif why := _entry_problem(fname, entry, limits):
            problems.append(f"{where}: {name}/{fname}: {why}")
        else:
            sizes[fname] = entry["size"]
    if sum(sizes.values()) > limits.revision_bytes:
        return [*problems, f"{mpath}: its files add up to {sum(sizes.values())} bytes, over the "
                           f"{limits.revision_bytes} a revision may take"]
    dest.mkdir(parents=True, exist_ok=True)
    for fname, size in sizes.items():
        why = _fetch_problem(storage, f"{name}/{fname}", dest, fname, size, files[fname]["sha256"], limits)
        if why:
            problems.append(f"{where}: {name}/{fname}: {why}")
    if problems:
        return problems
    for stem in (MODEL_STEM, artifact.TENSORS_STEM):
        got = stored_tensors(dest, files, stem, limits)
        if isinstance(got, str):
            problems.append(f"{where}: {name}/{got}")
    return problems


def _name_problem(fname: str) -> str | None:
    if not FILE_NAME.fullmatch(fname):
        return f"names a file outside the revision ({fname[:80]!r})"
    if fname.endswith(".py"):
        return f"names a Python file ({fname!r}); code from an upload is never run"
    return None


def _entry_problem(fname: str, entry: Any, limits: Limits) -> str | None:
    if not isinstance(entry, dict) or "size" not in entry or "sha256" not in entry:
        return "manifest entry lacks size or sha256"
    size, sha = entry["size"], entry["sha256"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return f"manifest size {str(size)[:40]} is not a number of bytes"
    if size > limits.file_bytes(fname):
        return f"manifest size {size} is over the {limits.file_bytes(fname)} bytes this file may take"
    if not isinstance(sha, str) or not SHA256.fullmatch(sha):
        return f"manifest sha256 {str(sha)[:20]!r} is not 64 hex digits"
    return None


def _fetch_problem(
    storage: Storage, key: str, dest: Path, fname: str, size: int, sha256: str, limits: Limits
) -> str | None:
    """Fetch one file (at most the manifest's size: a grown file is not read past it) into
    ``dest``; why it does not match its manifest entry, or None."""
    local = None if fname == OPTIMIZER_FILE else dest / fname  # the optimizer state is not loaded
    try:
        got = storage.fetch(key, local, size)
    except TooLarge as exc:
        return f"size {exc.size} != manifest {size}" if exc.size is not None else f"larger than the manifest's {size}"
    except OSError as exc:  # the local copy: a full or read-only temporary directory
        return f"cannot copy it to {dest}: {exc.strerror or exc}"
    if got is None:
        return "missing"
    if got[0] != size:  # truncated: the checksum cannot match either
        return f"size {got[0]} != manifest {size}"
    if got[1] != sha256:
        return f"sha256 {got[1][:16]}... != manifest {sha256[:16]}..."
    if local is not None and fname.endswith(".safetensors"):
        header = safetensors_header(local, limits)
        if isinstance(header, str):
            return f"not a safetensors file: {header}"
    return None


def stored_tensors(folder: Path, listed: Collection[str], stem: str, limits: Limits = LIMITS
                   ) -> dict[str, dict[str, Any]] | str | None:
    """The tensors ``stem`` names in a revision folder (``model``: the weights, ``pseudo_gradient``:
    the artifact's tensors), as ``safetensors_header`` gives them: from ``<stem>.safetensors``,
    or from the shards ``<stem>.safetensors.index.json`` names. None when ``listed`` (the
    manifest's files) holds neither; why they are refused as "<file>: why" otherwise."""
    single, index = tensor_files.single_name(stem), tensor_files.index_name(stem)
    pattern = tensor_files.shard_pattern(stem)
    shards = sorted(name for name in listed if pattern.fullmatch(name))
    if single in listed:
        if index in listed or shards:
            # Which of the two a loader would take is up to the loader: refused, not guessed.
            return f"{single}: listed beside {index if index in listed else shards[0]}; the tensors are in one " \
                   "file or in shards, not both"
        header = safetensors_header(folder / single, limits)
        return f"{single}: not a safetensors file: {header}" if isinstance(header, str) else header
    if index not in listed:
        return f"{shards[0]}: a shard, but the manifest lists no {index}" if shards else None
    return _sharded(folder, index, stem, shards, limits)


def _sharded(folder: Path, index: str, stem: str, listed_shards: list[str], limits: Limits
             ) -> dict[str, dict[str, Any]] | str:
    try:
        data = read_json(folder / index, limits.index_bytes, limits.json_depth)
    except Refused as exc:
        return f"{index}: {exc}"
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(f, str) for f in weight_map.values()):
        return f"{index}: has no weight_map of tensor names to shard files"
    pattern = tensor_files.shard_pattern(stem)
    named = sorted(set(weight_map.values()))
    for fname in named:
        if not pattern.fullmatch(fname):
            return f"{index}: names {fname[:80]!r}, not a shard of this revision ({stem}-00001-of-00002.safetensors)"
        if fname not in listed_shards:
            return f"{index}: names {fname}, which the manifest does not list"
    # save_pretrained names n shards 1-of-n to n-of-n; anything else is not what it wrote.
    n = len(named)
    if named != [f"{stem}-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]:
        return f"{index}: names {n} shard file(s), not {stem}-00001-of-{n:05d} to {stem}-{n:05d}-of-{n:05d}"
    if unnamed := [fname for fname in listed_shards if fname not in named]:
        return f"{unnamed[0]}: listed in the manifest, but {index} names no tensor in it"
    tensors: dict[str, dict[str, Any]] = {}
    holder: dict[str, int] = {}  # tensor -> the shard (its place in ``named``) that holds it
    header_bytes = 0
    for i, fname in enumerate(named):
        got = _read_header(folder / fname, limits)
        if isinstance(got, str):
            return f"{fname}: not a safetensors file: {got}"
        header, nbytes = got
        header_bytes += nbytes
        if header_bytes > limits.safetensors_header:
            return f"{fname}: the shards' headers take more than the {limits.safetensors_header} bytes one " \
                   "header may"
        for tensor, spec in header.items():
            if tensor in holder:
                return f"{fname}: holds tensor {tensor[:80]!r}, which {named[holder[tensor]]} holds too"
            holder[tensor], tensors[tensor] = i, spec
    for tensor, i in holder.items():
        if tensor not in weight_map:
            return f"{index}: does not name tensor {tensor[:80]!r}, which {named[i]} holds"
        if weight_map[tensor] != named[i]:
            return f"{index}: maps tensor {tensor[:80]!r} to {weight_map[tensor]}, but {named[i]} holds it"
    if missing := [tensor for tensor in weight_map if tensor not in holder]:
        return f"{index}: names {len(missing)} tensor(s) no shard holds, e.g. {missing[0][:80]!r}"
    return tensors


def safetensors_header(path: Path, limits: Limits = LIMITS) -> dict[str, dict[str, Any]] | str:
    """The tensors of a local safetensors file (name -> dtype, shape, data_offsets), read from
    its header alone, or why it is not one. Each tensor's bytes must be exactly its dtype's
    size times its shape's, and the tensors must fill the file back to back: so the shapes
    said here are backed by real bytes, and no tensor is larger than the file."""
    got = _read_header(path, limits)
    return got if isinstance(got, str) else got[0]


def _read_header(path: Path, limits: Limits) -> tuple[dict[str, dict[str, Any]], int] | str:
    """``safetensors_header``'s answer with the header's length in bytes."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return "not a regular file"
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                return "shorter than its 8-byte header length"
            n = int.from_bytes(head, "little")
            if n > limits.safetensors_header or 8 + n > size:
                return f"header length {n} does not fit the file ({size} bytes) or the {limits.safetensors_header} " \
                       "a header may take"
            raw = fh.read(n)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    try:
        header = load_json(raw, limits.json_depth)
    except Refused:
        return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    header.pop("__metadata__", None)
    why = _layout_problem(header, size - 8 - n)
    return why if why else (header, n)


def _layout_problem(header: dict[str, Any], data_bytes: int) -> str | None:
    spans = []
    for tensor, spec in header.items():
        label = f"tensor {tensor[:60]!r}"
        if not isinstance(spec, dict):
            return f"{label} is not described"
        offsets, shape, dtype = spec.get("data_offsets"), spec.get("shape"), spec.get("dtype")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o) for o in offsets)):
            return f"{label} has no data offsets"
        if dtype not in DTYPE_BYTES:
            return f"{label} has an unknown dtype {str(dtype)[:20]!r}"
        if not (isinstance(shape, list) and all(_is_size(d) for d in shape)):
            return f"{label} has no shape"
        begin, end = offsets
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            return f"{label} takes {end - begin} bytes, its {dtype} shape {str(shape)[:60]} needs " \
                   f"{math.prod(shape) * DTYPE_BYTES[dtype]}"
        spans.append((begin, end))
    at = 0
    for begin, end in sorted(spans):
        if begin != at:
            return f"its tensors overlap or leave a gap at byte {at}"
        at = end
    if at != data_bytes:
        return f"its tensors end at byte {at} of the data, the file has {data_bytes}"
    return None


def _is_size(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def tensor_shapes(header: dict[str, dict[str, Any]]) -> dict[str, list[int]]:
    """Name -> shape of a header ``safetensors_header`` accepted."""
    return {name: list(spec["shape"]) for name, spec in header.items()}


def tensor_elements(header: dict[str, dict[str, Any]]) -> int:
    return sum(math.prod(spec["shape"]) for spec in header.values())
