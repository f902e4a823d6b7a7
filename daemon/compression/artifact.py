"""The pseudo-gradient as a file: safetensors for the tensors, a JSON header beside it.

``pseudo_gradient.safetensors`` holds, per parameter, ``<name>.indices`` (int16, one row of
kept positions per block), ``<name>.values`` (int8 with ``<name>.scales``, or float32) or,
for small tensors, ``<name>.dense``. ``pseudo_gradient.json`` names the codec, its settings,
the outer round, and each parameter's shape and block layout. Nothing is pickled: a file
from an untrusted miner is read as numbers and JSON only.

The tensors file can outgrow what one object may hold: with codec ``none`` it is the whole
float32 pseudo-gradient (32 GB for an 8B model), and a large ``keep`` without ``quantize``
sends 6 bytes a parameter. So with ``shard_bytes`` it is split as the weights are
(``daemon/tensor_files.py``): ``pseudo_gradient-00001-of-0000N.safetensors`` ... and
``pseudo_gradient.safetensors.index.json``; a parameter's parts may fall into different
shards, and ``TensorFile`` reads them as one mapping. The JSON header stays one file: a line
per parameter, far below any such limit.

The pseudo-gradient is ``weights at the start of the outer round - weights now``: a
validator subtracts the decoded tensor from the round's starting weights to get this
miner's weights back (within the codec's error).

An artifact carries no error feedback: each is the whole pseudo-gradient of the round so far,
relative to the round's start, so that a validator can apply any one of them alone. Error
feedback belongs to the outer sync (``sync.py``), where what is left out of one round would
otherwise be lost to training.

``problems`` is what ``minerd verify-upload`` runs on a published artifact: a known codec,
the model's shapes, exactly the layout the encoder gives each shape, tensors that add up to
it, indices inside their blocks, and numbers that decode finite. The file is hostile until
checked: everything its header says is checked against the shapes before a tensor is read,
tensors are read one at a time, and nothing is decoded (a block of one kept value stands
for up to 32,761, so decoding is what a small forged file would make expensive): whether
the decoded values are finite follows from the kept values alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open

from daemon import atomic, tensor_files
from daemon.compression.codec import CODECS, FORMAT, CodecSpec, Encoded, block_layout, keep_count

TENSORS_STEM = "pseudo_gradient"
TENSORS_FILE = tensor_files.single_name(TENSORS_STEM)  # pseudo_gradient.safetensors
TENSORS_INDEX = tensor_files.index_name(TENSORS_STEM)  # pseudo_gradient.safetensors.index.json
HEADER_FILE = "pseudo_gradient.json"
# An index inside a block is an int16: a block holds at most 181 x 181 = 32,761 values
# (compression.block's limit).
MAX_BLOCK = 181
# Lines of findings reported for one artifact: a forged header may describe a million tensors.
MAX_LINES = 20
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_DTYPES = {"I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8,
           "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
           "BOOL": torch.bool}


def write(enc: Encoded, folder: Path, *, shard_bytes: int | None = None, **about: Any) -> list[str]:
    """Write the tensors and the header into ``folder`` (each file atomically); ``about`` joins
    the header (outer step, inner steps). Tensors of more than ``shard_bytes`` in all go into
    shards with an index (None: one file). Returns the names written."""
    names = tensor_files.write(enc.tensors, folder, TENSORS_STEM, shard_bytes, metadata={"format": "pt"})
    atomic.write_bytes(folder / HEADER_FILE, header_bytes({**enc.header, **about}))
    return [*names, HEADER_FILE]


def header_bytes(header: dict[str, Any]) -> bytes:
    return (json.dumps(header, indent=1, sort_keys=True) + "\n").encode()


class TensorFile(Mapping[str, torch.Tensor]):
    """The tensors of a safetensors file, or of the shards of one (``paths``: each shard), each
    read from disk only when asked for; their dtypes and shapes come from the headers, so they
    can be checked before anything is read. A tensor in two of the files is a ValueError: which
    one would be meant is not for the reader to guess."""

    def __init__(self, *paths: Path) -> None:
        self._where: dict[str, Any] = {}  # tensor name -> the open file that holds it
        for path in paths:
            fh = safe_open(str(path), framework="pt")
            keys: list[str] = fh.keys()  # a safe_open handle is not iterable itself
            for key in keys:
                if key in self._where:
                    raise ValueError(f"tensor {key[:80]!r} is in two files (again in {path.name})")
                self._where[key] = fh

    def spec(self, key: str) -> tuple[torch.dtype | None, list[int]] | None:
        fh = self._where.get(key)
        if fh is None:
            return None
        part = fh.get_slice(key)
        return _DTYPES.get(part.get_dtype()), list(part.get_shape())

    def __getitem__(self, key: str) -> torch.Tensor:
        fh = self._where.get(key)
        if fh is None:
            raise KeyError(key)
        return cast(torch.Tensor, fh.get_tensor(key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _spec(tensors: Mapping[str, torch.Tensor], key: str) -> tuple[torch.dtype | None, list[int]] | None:
    if isinstance(tensors, TensorFile):
        return tensors.spec(key)
    t = tensors.get(key)
    return None if t is None else (t.dtype, list(t.shape))


def problems(
    header: Any, tensors: Mapping[str, torch.Tensor], expected: dict[str, list[int]] | None, complete: bool = True
) -> list[str]:
    """What is wrong with an artifact (one line per finding, at most one per parameter and
    ``MAX_LINES`` in all); empty when it decodes to finite tensors of the model's shapes.
    ``expected`` maps the model's parameter names to their shapes (None: not known, shapes are
    checked against the header alone); with ``complete`` every one of them must be there (off
    when ``expected`` came from a weights file, which holds buffers too)."""
    head = _header_problem(header)
    if head:
        return [head]
    found: list[str] = []
    named: set[str] = set()
    layouts: dict[str, Any] = header["tensors"]
    spec = CodecSpec.of(header["codec"], header["block"], header["keep"], header["quantize"])
    for name, lay in layouts.items():
        named.update(f"{name}.{part}" for part in ("dense", "indices", "values", "scales"))
        why = _tensor_problem(spec, name, lay, tensors, expected)
        if why:
            found.append(f"tensor {name[:80]!r}: {why}")
    stray = sorted(set(tensors) - named)
    if stray:
        found.append(f"holds {len(stray)} tensor(s) the header does not describe, e.g. {stray[0][:80]!r}")
    if expected is not None and complete:
        missing = sorted(set(expected) - set(layouts))
        if missing:
            found.append(f"lacks {len(missing)} of the model's parameters, e.g. {missing[0][:80]!r}")
    if len(found) > MAX_LINES:
        found = [*found[: MAX_LINES - 1], f"and {len(found) - MAX_LINES + 1} more findings"]
    return found


def _header_problem(header: Any) -> str | None:
    if not isinstance(header, dict):
        return "header is not a JSON object"
    if header.get("format") != FORMAT:
        return f"header format {str(header.get('format'))[:40]} is not {FORMAT}"
    if header.get("codec") not in CODECS:
        return f"unknown codec {str(header.get('codec'))[:40]!r}; known: {', '.join(CODECS)}"
    if not _is_int(header.get("block")) or not 2 <= header["block"] <= MAX_BLOCK:
        return f"block {str(header.get('block'))[:40]} is not an integer in 2..{MAX_BLOCK}"
    keep = header.get("keep")
    if not isinstance(keep, int | float) or isinstance(keep, bool) or not 0 < keep <= 1:
        return f"keep {str(keep)[:40]} is not a share in (0, 1]"
    if not isinstance(header.get("quantize"), bool):
        return "quantize is not true or false"
    if not isinstance(header.get("tensors"), dict) or not header["tensors"]:
        return "names no tensors"
    return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _tensor_problem(
    spec: CodecSpec, name: str, lay: Any, tensors: Mapping[str, torch.Tensor], expected: dict[str, list[int]] | None,
) -> str | None:
    if not isinstance(lay, dict):
        return "its layout is not a JSON object"
    shape = lay.get("shape")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        return f"shape {str(shape)[:60]} is not a list of sizes"
    if expected is not None:
        if name not in expected:
            return "not a parameter of the model"
        if list(expected[name]) != shape:
            return f"shape {str(shape)[:60]} but the model's is {str(list(expected[name]))[:60]}"
    blocks = block_layout(shape, spec)
    if blocks is None:
        if lay.get("layout") != "dense":
            return f"layout {str(lay.get('layout'))[:40]!r}, but the codec sends a tensor of this shape dense"
        return _dense_problem(name, math.prod(shape), tensors)
    if lay.get("layout") != "blocks":
        return f"layout {str(lay.get('layout'))[:40]!r}, but the codec sends a tensor of this shape in blocks"
    rows, cols, bm, bn = blocks
    k = keep_count(bm, bn, spec.keep)
    if lay.get("block") != [bm, bn] or lay.get("k") != k:
        return f"blocks {str(lay.get('block'))[:40]} keeping {str(lay.get('k'))[:20]}, but the codec cuts a " \
               f"{rows}x{cols} tensor into blocks of {bm}x{bn} and keeps {k} of each"
    return _blocks_problem(spec, name, (rows // bm) * (cols // bn), bm * bn, k, tensors)


def _dense_problem(name: str, numel: int, tensors: Mapping[str, torch.Tensor]) -> str | None:
    got = _spec(tensors, f"{name}.dense")
    if got is None:
        return "dense values missing"
    dtype, shape = got
    if shape != [numel] or dtype is None or not dtype.is_floating_point:
        return f"dense values: {str(shape)[:40]} {dtype} for a shape of {numel}"
    return None if bool(torch.isfinite(tensors[f"{name}.dense"]).all()) else "dense values not finite"


def _blocks_problem(
    spec: CodecSpec, name: str, nblocks: int, size: int, k: int, tensors: Mapping[str, torch.Tensor]
) -> str | None:
    want = torch.int8 if spec.quantize else torch.float32
    for part, dtype, shape in (("indices", torch.int16, [nblocks, k]), ("values", want, [nblocks, k]),
                               ("scales", torch.float32, [nblocks])):
        if part == "scales" and not spec.quantize:
            continue
        got = _spec(tensors, f"{name}.{part}")
        if got is None:
            return f"{part} missing"
        if got != (dtype, shape):
            return f"{part} are {got[0]} {str(got[1])[:40]}, expected {dtype} {shape}"
    # Sizes and dtypes checked: reading them allocates what the file holds, no more.
    idx = tensors[f"{name}.indices"]
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
        return f"an index lies outside its block of {size} values (range {int(idx.min())}..{int(idx.max())})"
    if k > 1 and bool((idx.sort(dim=1).values.diff(dim=1) == 0).any()):
        return "an index repeats within a block"
    del idx
    vals = tensors[f"{name}.values"]
    if spec.quantize:
        scales = tensors[f"{name}.scales"]
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            return "scales not finite and non-negative"
        top = 128.0 * float(scales.max()) if scales.numel() else 0.0  # |int8| <= 128
    else:
        if not bool(torch.isfinite(vals).all()):
            return "values not finite"
        top = float(vals.abs().max()) if vals.numel() else 0.0
    # Decoding puts a block's kept values in place (topk) or multiplies the block by DCT bases
    # whose entries are at most sqrt(2) in size (dct_topk): no decoded value, nor any partial
    # sum on the way, exceeds 2 x the sum of the block's |kept values| <= 2 x k x top.
    if 2.0 * k * top >= FLOAT32_MAX / 2:
        return f"decodes to values too large for float32 (kept values up to {top:.3g})"
    return None
