"""DiLoCo's outer sync with compressed pseudo-gradients.

Each rank encodes its pseudo-gradient (with error feedback: what its last encodings left
out is added first), the ranks all-gather the encodings (every rank's is the same size:
same shapes, same codec), and each rank decodes all of them and averages in rank order.
Every rank therefore applies bit-for-bit the same update and the ranks' parameters stay
identical after each outer step, as with the dense all-reduce. A top-k encoding cannot be
summed where it is compressed (the ranks keep different positions), so gather, not reduce:
each rank sends its own encoding once, and receives the others'.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from daemon.compression.codec import CodecSpec, Encoded, ErrorFeedback, decode
from daemon.compression.stats import CompressionStats
from daemon.distributed import CommCounter


def pack(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """One flat byte tensor of every tensor's bytes, in the dict's order."""
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors.values()])


def unpack(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``pack``'s inverse, with the names, dtypes and shapes of ``like``."""
    out, offset = {}, 0
    for name, t in like.items():
        n = t.numel() * t.element_size()
        # A copy: a view at an odd byte offset cannot be reinterpreted as a wider type.
        out[name] = flat[offset : offset + n].clone().view(t.dtype).reshape(t.shape)
        offset += n
    return out


class CompressedAverage:
    """The outer step's reduction (``OuterOptimizer.reduce``): replaces each pseudo-gradient
    in place by the average of every rank's decoded encoding. Its error-feedback residual is
    checkpointed (rank 0's; other ranks start a restored run with none, which costs a little of
    one round's update and nothing in agreement)."""

    def __init__(self, names: Sequence[str], spec: CodecSpec, comm: CommCounter, stats: CompressionStats,
                 rank: int = 0, device: torch.device | str = "cpu") -> None:
        self.names = list(names)
        self.device = device
        self.spec = spec
        self.feedback = ErrorFeedback(spec)
        self.comm = comm
        self.stats = stats
        self.rank = rank

    def __call__(self, grads: list[torch.Tensor]) -> dict[str, float] | None:
        if not dist.is_initialized():
            return None
        t0 = time.perf_counter()
        enc, sent = self.feedback.encode(dict(zip(self.names, grads, strict=True)))
        encode_s = time.perf_counter() - t0
        payload = pack(enc.tensors)
        world = dist.get_world_size()
        gathered = [torch.empty_like(payload) for _ in range(world)]
        dist.all_gather(gathered, payload)
        self.comm.add([payload])
        t1 = time.perf_counter()
        mine = dist.get_rank()
        total = {n: torch.zeros_like(g, dtype=torch.float32) for n, g in zip(self.names, grads, strict=True)}
        for r, buf in enumerate(gathered):
            # This rank's own share is what it decoded for the error feedback: the same bits.
            part = sent if r == mine else decode(Encoded(unpack(buf, enc.tensors), enc.header), buf.device)
            for n in self.names:
                total[n].add_(part[n])
        for n, g in zip(self.names, grads, strict=True):
            g.copy_(total[n].div_(world))
        decode_s = time.perf_counter() - t1
        dense = sum(g.numel() * 4 for g in grads)
        self.stats.record("outer_sync", payload.numel(), dense, encode_s, decode_s)
        return {"sync_bytes": payload.numel(), "sync_ratio": round(dense / payload.numel(), 2),
                "sync_seconds": round(time.perf_counter() - t0, 4),
                "codec_seconds": round(encode_s + decode_s, 4)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.feedback.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.rank == 0:
            self.feedback.load_state_dict(state, self.device)
