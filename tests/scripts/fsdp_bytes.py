"""Run under torchrun by tests/test_memory_plan.py (CPU, gloo, two ranks): shard the tiny
Llama with FSDP2 as the trainer does (each decoder block, then the root), run one
forward, backward and AdamW step, and print one JSON line per rank with the bytes that
rank holds: its shards of the parameters, gradients and optimizer moments, and the
parameters all-gathered while a middle block computes (what memory_plan calls the
all-gathered block).

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/scripts/fsdp_bytes.py VOCAB BATCH SEQ
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from daemon.tasks.causal_lm.model import llama_config


def local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def main() -> None:
    vocab, batch, seq = (int(a) for a in sys.argv[1:4])
    dist.init_process_group("gloo")
    torch.manual_seed(0)  # the same initial weights on every rank, as after a broadcast
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config("tiny", vocab, None))
    layers: list[nn.Module] = list(model.model.layers)
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)

    gathered: list[int] = []

    def count_gathered(module: nn.Module, args: object) -> None:
        # FSDP's own pre-forward hook (registered first) has all-gathered this block by now; the
        # root's parameters stay gathered from the root's forward to the end of its backward.
        gathered.append(sum(p.numel() * p.element_size() for p in model.parameters() if not isinstance(p, DTensor)))

    layers[len(layers) // 2].register_forward_pre_hook(count_gathered)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False, fused=False)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(dist.get_rank()))
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits
    F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
    optimizer.step()
    moments = [t for state in optimizer.state.values() for k, t in state.items() if k in ("exp_avg", "exp_avg_sq")]
    report = {
        "rank": dist.get_rank(),
        "parameters": sum(local_bytes(p) for p in model.parameters()),
        "gradients": sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None),
        "adamw": sum(local_bytes(t) for t in moments),
        "gathered": gathered[0],
    }
    print(json.dumps(report), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
