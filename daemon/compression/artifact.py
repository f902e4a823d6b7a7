"""The pseudo-gradient as a file: safetensors for the tensors, a JSON header beside it.

``pseudo_gradient.safetensors`` holds, per parameter, ``<name>.indices`` (int16, one row of
kept positions per block), ``<name>.values`` (int8 with ``<name>.scales``, or float32) or,
for small tensors, ``<name>.dense``. ``pseudo_gradient.json`` names the codec, its settings,
the outer round, and each parameter's shape and block layout. Nothing is pickled: a file
from an untrusted miner is read as numbers and JSON only.

The pseudo-gradient is ``weights at the start of the outer round - weights now``: a
validator subtracts the decoded tensor from the round's starting weights to get this
miner's weights back (within the codec's error).

An artifact carries no error feedback: each is the whole pseudo-gradient of the round so far,
relative to the round's start, so that a validator can apply any one of them alone. Error
feedback belongs to the outer sync (``sync.py``), where what is left out of one round would
otherwise be lost to training.

``problems`` is what ``minerd verify-upload`` runs on a published artifact: a known codec,
tensors that add up to the header's layout, indices inside their blocks, finite numbers,
and shapes that are the model's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from daemon import atomic
from daemon.compression.codec import CODECS, FORMAT, Encoded, decode
from daemon.disk import save_safetensors

TENSORS_FILE = "pseudo_gradient.safetensors"
HEADER_FILE = "pseudo_gradient.json"
MAX_HEADER_BYTES = 16 << 20


def write(enc: Encoded, folder: Path, **about: Any) -> list[str]:
    """Write both files into ``folder`` (each atomically); ``about`` joins the header
    (outer step, inner steps). Returns the names written."""
    atomic.write_with(folder / TENSORS_FILE, lambda tmp: save_safetensors(enc.tensors, tmp, {"format": "pt"}))
    atomic.write_bytes(folder / HEADER_FILE, header_bytes({**enc.header, **about}))
    return [TENSORS_FILE, HEADER_FILE]


def header_bytes(header: dict[str, Any]) -> bytes:
    return (json.dumps(header, indent=1, sort_keys=True) + "\n").encode()


def problems(
    header: Any, tensors: dict[str, torch.Tensor], expected: dict[str, list[int]] | None, complete: bool = True
) -> list[str]:
    """What is wrong with an artifact (one line per finding, at most one per parameter);
    empty when it decodes to finite tensors of the model's shapes. ``expected`` maps the
    model's parameter names to their shapes (None: not known, shapes are checked against
    the header alone); with ``complete`` every one of them must be there (off when
    ``expected`` came from a weights file, which holds buffers too)."""
    head = _header_problem(header)
    if head:
        return [head]
    found: list[str] = []
    named: set[str] = set()
    layouts: dict[str, Any] = header["tensors"]
    for name, lay in layouts.items():
        why = _tensor_problem(header, name, lay, tensors, expected)
        named.update(f"{name}.{part}" for part in ("dense", "indices", "values", "scales"))
        if why:
            found.append(f"tensor {name[:80]!r}: {why}")
    stray = sorted(set(tensors) - named)
    if stray:
        found.append(f"holds {len(stray)} tensor(s) the header does not describe, e.g. {stray[0][:80]!r}")
    if expected is not None and complete:
        missing = sorted(set(expected) - set(layouts))
        if missing:
            found.append(f"lacks {len(missing)} of the model's parameters, e.g. {missing[0][:80]!r}")
    if found:
        return found
    decoded = decode(Encoded(tensors, header))
    bad = next((n for n, t in decoded.items() if not bool(torch.isfinite(t).all())), None)
    return [f"tensor {bad[:80]!r}: decodes to non-finite values"] if bad else []


def _header_problem(header: Any) -> str | None:
    if not isinstance(header, dict):
        return "header is not a JSON object"
    if header.get("format") != FORMAT:
        return f"header format {header.get('format')!r} is not {FORMAT}"
    if header.get("codec") not in CODECS:
        return f"unknown codec {str(header.get('codec'))[:40]!r}; known: {', '.join(CODECS)}"
    if not _is_int(header.get("block")) or not 2 <= header["block"] <= 256:
        return f"block {header.get('block')!r} is not an integer in 2..256"
    keep = header.get("keep")
    if not isinstance(keep, int | float) or isinstance(keep, bool) or not 0 < keep <= 1:
        return f"keep {keep!r} is not a share in (0, 1]"
    if not isinstance(header.get("quantize"), bool):
        return "quantize is not true or false"
    if not isinstance(header.get("tensors"), dict) or not header["tensors"]:
        return "names no tensors"
    return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _tensor_problem(
    header: dict[str, Any], name: str, lay: Any, tensors: dict[str, torch.Tensor],
    expected: dict[str, list[int]] | None,
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
            return f"shape {shape} but the model's is {list(expected[name])}"
    numel = math.prod(shape)
    if lay.get("layout") == "dense":
        t = tensors.get(f"{name}.dense")
        if t is None:
            return "dense values missing"
        if t.numel() != numel or not t.is_floating_point():
            return f"dense values: {t.numel()} {t.dtype} for a shape of {numel}"
        return None if bool(torch.isfinite(t).all()) else "dense values not finite"
    if lay.get("layout") != "blocks":
        return f"unknown layout {str(lay.get('layout'))[:40]!r}"
    return _blocks_problem(header, name, lay, shape, tensors)


def _blocks_problem(
    header: dict[str, Any], name: str, lay: dict[str, Any], shape: list[int], tensors: dict[str, torch.Tensor]
) -> str | None:
    block, k_raw = lay.get("block"), lay.get("k")
    if not (isinstance(block, list) and len(block) == 2 and all(_is_int(b) and b > 0 for b in block)):
        return f"block {str(block)[:40]} is not two sizes"
    bm, bn = block
    if not isinstance(k_raw, int) or isinstance(k_raw, bool) or not 1 <= k_raw <= bm * bn:
        return f"k {k_raw!r} is not in 1..{bm * bn}"
    k = k_raw
    if len(shape) < 2:
        return "blocks need at least two dimensions"
    rows, cols = shape[0], math.prod(shape[1:])
    if rows % bm or cols % bn or max(bm, bn) > header["block"]:
        return f"blocks of {bm}x{bn} do not tile {rows}x{cols} within the codec's block {header['block']}"
    nblocks = (rows // bm) * (cols // bn)
    idx, vals = tensors.get(f"{name}.indices"), tensors.get(f"{name}.values")
    if idx is None or vals is None:
        return "indices or values missing"
    if idx.dtype != torch.int16 or tuple(idx.shape) != (nblocks, k):
        return f"indices are {idx.dtype} {list(idx.shape)}, expected int16 [{nblocks}, {k}]"
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= bm * bn):
        return f"an index lies outside its block of {bm * bn} values (range {int(idx.min())}..{int(idx.max())})"
    if k > 1 and bool((idx.sort(dim=1).values.diff(dim=1) == 0).any()):
        return "an index repeats within a block"
    want = torch.int8 if header["quantize"] else torch.float32
    if vals.dtype != want or tuple(vals.shape) != (nblocks, k):
        return f"values are {vals.dtype} {list(vals.shape)}, expected {want} [{nblocks}, {k}]"
    if header["quantize"]:
        scales = tensors.get(f"{name}.scales")
        if scales is None or scales.dtype != torch.float32 or tuple(scales.shape) != (nblocks,):
            return f"scales missing or not float32 [{nblocks}]"
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            return "scales not finite and non-negative"
    elif not bool(torch.isfinite(vals).all()):
        return "values not finite"
    return None
