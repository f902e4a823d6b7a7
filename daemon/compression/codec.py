"""The pseudo-gradient codec: block top-k, optionally in the DCT domain, optionally 8-bit.

One codec serves both the upload artifact validators score and the outer step's
synchronisation. Each matrix is cut into blocks whose sides are the largest divisors
of its dimensions up to ``block`` (64: blocks of up to 64 x 64); ``dct_topk`` moves
each block into the 2-D DCT-II domain (orthonormal, so the inverse is the transpose),
where a pseudo-gradient's energy gathers in few coefficients; then the ``keep`` share of
each block's values with the largest magnitude is kept, with its index inside the block
(int16: a block holds at most 181 x 181 values, the limit on ``compression.block``). With
``quantize``, the kept values are int8 with one float scale per block. Vectors and small
tensors (biases, norms: a few hundred values) are sent dense. ``none`` sends everything dense.

An encoding is a flat dict of tensors (safetensors-ready: no pickle) plus a JSON header
naming the codec, its parameters and each tensor's shape and layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal, cast

import torch

FORMAT = 1
CodecName = Literal["none", "topk", "dct_topk"]
CODECS: tuple[str, ...] = ("none", "topk", "dct_topk")
DENSE_BELOW = 4096  # tensors with fewer values (or fewer than two dimensions) go dense


@dataclass(frozen=True)
class CodecSpec:
    name: CodecName = "dct_topk"
    block: int = 64
    keep: float = 1 / 32  # share of each block's values sent
    quantize: bool = True  # 8-bit values, a float scale per block

    def header(self) -> dict[str, Any]:
        return {"codec": self.name, "block": self.block, "keep": self.keep, "quantize": self.quantize}

    @classmethod
    def of(cls, name: str, block: int, keep: float, quantize: bool) -> CodecSpec:
        if name not in CODECS:
            raise ValueError(f"unknown codec {name!r}; one of {', '.join(CODECS)}")
        return cls(cast(CodecName, name), block, keep, quantize)


@dataclass
class Encoded:
    tensors: dict[str, torch.Tensor]
    header: dict[str, Any]
    shapes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors as sent (the header is a few hundred bytes more)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _largest_divisor(n: int, cap: int) -> int:
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1


@cache
def dct_basis(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix of size n (rows are frequencies)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    basis = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    basis[0] /= math.sqrt(2.0)
    return basis.float()


def block_layout(shape: Sequence[int], spec: CodecSpec) -> tuple[int, int, int, int] | None:
    """(rows, cols, block rows, block cols) of a tensor sent in blocks; None for dense. The
    only layout ``encode`` produces for a shape, so a reader can demand exactly it."""
    if spec.name == "none" or len(shape) < 2 or math.prod(shape) < DENSE_BELOW:
        return None
    rows, cols = shape[0], math.prod(shape[1:])
    return rows, cols, _largest_divisor(rows, spec.block), _largest_divisor(cols, spec.block)


def _to_blocks(x: torch.Tensor, rows: int, cols: int, bm: int, bn: int) -> torch.Tensor:
    return x.reshape(rows // bm, bm, cols // bn, bn).permute(0, 2, 1, 3).reshape(-1, bm, bn)


def _from_blocks(blocks: torch.Tensor, rows: int, cols: int, bm: int, bn: int) -> torch.Tensor:
    return blocks.reshape(rows // bm, cols // bn, bm, bn).permute(0, 2, 1, 3).reshape(rows, cols)


def keep_count(bm: int, bn: int, keep: float) -> int:
    return max(1, min(bm * bn, round(bm * bn * keep)))


def encode(tensors: dict[str, torch.Tensor], spec: CodecSpec) -> Encoded:
    out: dict[str, torch.Tensor] = {}
    layouts: dict[str, Any] = {}
    shapes: dict[str, list[int]] = {}
    for name, t in tensors.items():
        x = t.detach().float()
        shapes[name] = list(t.shape)
        lay = block_layout(t.shape, spec)
        if lay is None:
            out[f"{name}.dense"] = x.reshape(-1).contiguous()
            layouts[name] = {"shape": list(t.shape), "layout": "dense"}
            continue
        rows, cols, bm, bn = lay
        blocks = _to_blocks(x, rows, cols, bm, bn)
        if spec.name == "dct_topk":
            blocks = dct_basis(bm).to(x.device) @ blocks @ dct_basis(bn).to(x.device).T
        flat = blocks.reshape(blocks.shape[0], bm * bn)
        k = keep_count(bm, bn, spec.keep)
        idx = flat.abs().topk(k, dim=1).indices
        vals = flat.gather(1, idx)
        out[f"{name}.indices"] = idx.to(torch.int16).contiguous()
        if spec.quantize:
            scale = (vals.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
            out[f"{name}.values"] = (vals / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
            out[f"{name}.scales"] = scale.contiguous()
        else:
            out[f"{name}.values"] = vals.contiguous()
        layouts[name] = {"shape": list(t.shape), "layout": "blocks", "block": [bm, bn], "k": k}
    header = {"format": FORMAT, **spec.header(), "tensors": layouts}
    return Encoded(out, header, shapes)


def decode(enc: Encoded, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors again (lossy); KeyError/ValueError for an encoding that does not add up
    (``artifact.problems`` checks a file before it gets here)."""
    return {name: decode_tensor(enc, name, device) for name in enc.header["tensors"]}


def decode_tensor(enc: Encoded, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """One tensor of an encoding: a reader of a large one decodes, uses and frees them one at a time."""
    header, lay = enc.header, enc.header["tensors"][name]
    shape = torch.Size(lay["shape"])
    if lay["layout"] == "dense":
        return enc.tensors[f"{name}.dense"].to(device, torch.float32).reshape(shape)
    bm, bn = lay["block"]
    rows, cols = shape[0], math.prod(shape[1:])
    idx = enc.tensors[f"{name}.indices"].to(device).long()
    vals = enc.tensors[f"{name}.values"].to(device)
    if header["quantize"]:
        vals = vals.float() * enc.tensors[f"{name}.scales"].to(device)[:, None]
    flat = torch.zeros(idx.shape[0], bm * bn, device=device)
    flat.scatter_(1, idx, vals.float())
    blocks = flat.reshape(-1, bm, bn)
    if header["codec"] == "dct_topk":
        blocks = dct_basis(bm).to(device).T @ blocks @ dct_basis(bn).to(device)
    return _from_blocks(blocks, rows, cols, bm, bn).reshape(shape)


class ErrorFeedback:
    """What compression left out is carried into the next round, so that over many rounds the
    sum of what was sent follows the sum of the true pseudo-gradients (no bias)."""

    def __init__(self, spec: CodecSpec) -> None:
        self.spec = spec
        self.residual: dict[str, torch.Tensor] = {}

    def encode(self, grads: dict[str, torch.Tensor]) -> tuple[Encoded, dict[str, torch.Tensor]]:
        """The encoding of ``grads`` plus what was left out last time, and what it decodes to
        (what was sent); the new residual is the difference."""
        carried = {}
        for n, g in grads.items():
            g = g.detach().float()
            r = self.residual.get(n)
            carried[n] = g + r if r is not None and r.shape == g.shape else g
        enc = encode(carried, self.spec)
        sent = decode(enc, next(iter(carried.values())).device) if carried else {}
        self.residual = {n: carried[n] - sent[n] for n in carried}
        return enc, sent

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: r.cpu() for n, r in self.residual.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        self.residual = {n: r.to(device).clone() for n, r in state.items()}
