"""How much memory each rank of a run needs, worked out before anything is allocated.

``minerd diagnose`` prints the plan; the runner asks ``refusal(plan)`` before it puts the
model on a CUDA device, so that a run that cannot fit says so in one line at the start
instead of dying out of memory minutes in. The model is built on the ``meta`` device
(``Catalog.meta_model``): shapes without storage, so an 8B model is planned on a laptop.

Counted per rank, in bytes (N ranks):

- parameters (fp32 masters); gradients, one per parameter of its dtype; AdamW, two fp32
  moments per parameter (its step counters, 4 bytes a tensor on the host, are left out);
  outer, the anchor and momentum of the outer step (on the host with train.outer_offload).
  Under train.sharding=fsdp each is a shard: FSDP2 pads dim 0 to a multiple of N, so a
  parameter takes ceil(dim0 / N) rows on every rank.
- all-gathered (fsdp): the root's own parameters (embedding, final norm, output layer: FSDP2
  keeps the root unsharded from its forward to the end of its backward) and one decoder
  block (bf16 on CUDA under bf16 autocast, else fp32), and in the backward their unsharded
  gradients, reduced in fp32.
- DDP buckets (train.sync=ddp over several unsharded ranks): a flat copy of the gradients.
- activations: what autograd keeps for the backward of one micro-batch (train.batch_size
  sequences of lm.seq_len tokens), from the Llama layer's structure (``llama_activations``,
  checked against a real model's saved tensors in tests/test_memory_plan.py); with
  activation checkpointing each block's input, what the rest keeps, and one block's full
  set while it is recomputed.
- loss gradient: the backward starts with the fp32 gradients of the log-probabilities and of
  the logits (tokens x vocabulary x 4 bytes each). Under checkpointing they are gone before
  the first block is recomputed: the larger of the two counts.
- outer step: the pseudo-gradient (a copy of the parameters, beside the model even with
  offload: its reduction runs there) and, for DiLoCo's dense all-reduce, its flattened copy;
  the gradients are freed by then (zero_grad(set_to_none=True)).

The device total is the larger of the inner step's peak and the outer step's: an upper bound
where it adds what the backward frees to what it fills. Left to MARGIN: the CUDA context, cuBLAS and
NCCL workspaces, fragmentation. Not counted: torch.compile's own choices, FSDP2's prefetch of
the next block, the data loader and the libraries on the host.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from daemon.config import Config
from daemon.engine.trainer import amp_dtype
from daemon.tasks.causal_lm.config import LmConfig

# Of the device's memory, kept out of the plan: the CUDA context (~0.5 GB), cuBLAS and
# NCCL workspaces, and the caching allocator's fragmentation, which grows with long runs.
MARGIN = 0.10
FP32 = 4
GB = 1e9


@dataclass(frozen=True)
class Activations:
    """Bytes autograd keeps for one micro-batch."""

    full: int  # no checkpointing: every block's saved tensors and those outside the blocks
    checkpointed: int  # each block's input, those outside the blocks, and one block recomputed
    block: int  # one block's saved tensors
    loss_gradient: int  # transient at the start of the backward


@dataclass(frozen=True)
class Plan:
    """One rank's bytes by component, and what they are measured against."""

    world_size: int
    device: str  # "cuda:0", "cpu"
    sharded: bool
    model_class: str
    parameter_count: int  # of the whole model
    vocab: int | None  # the embedding's rows: lm.vocab_size unless a tokenizer or lm.init_from says
    sequences: int  # per micro-batch on a rank
    seq_len: int | None
    compute_dtype: str
    checkpointing: bool
    outer_on_host: bool
    parameters: int
    gradients: int
    adamw: int
    outer: int
    ddp_buckets: int
    gathered: int  # unsharded parameters while a block computes (fsdp)
    gathered_grads: int  # their unsharded gradients in the backward, reduced in fp32
    outer_step: int
    activations: Activations | None  # None: no activation model for this model
    capacity: int | None  # the device's bytes; None: unknown (CUDA planned on a machine without it)
    host_capacity: int
    margin: float = MARGIN

    @property
    def activation_peak(self) -> int:
        a = self.activations
        if a is None:
            return 0
        if self.checkpointing:
            return a.checkpointed - a.block + max(a.block, a.loss_gradient)
        return a.full + a.loss_gradient

    @property
    def inner_peak(self) -> int:
        outer = 0 if self.outer_on_host else self.outer
        return (self.parameters + self.gradients + self.adamw + outer + self.ddp_buckets + self.gathered
                + self.gathered_grads + self.activation_peak)

    @property
    def outer_peak(self) -> int:
        # The pseudo-gradient is formed beside the model, where its reduction runs, offload or not.
        outer = 0 if self.outer_on_host else self.outer
        return self.parameters + self.adamw + outer + self.outer_step

    @property
    def device_total(self) -> int:
        return max(self.inner_peak, self.outer_peak)

    @property
    def host_total(self) -> int:
        return self.outer if self.outer_on_host else 0

    @property
    def usable(self) -> int | None:
        return None if self.capacity is None else int(self.capacity * (1 - self.margin))

    @property
    def fits(self) -> bool | None:
        return None if self.usable is None else self.device_total <= self.usable

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "activation_peak": self.activation_peak, "device_total": self.device_total,
                "host_total": self.host_total, "usable": self.usable, "fits": self.fits}


def llama_activations(config: Any, sequences: int, seq_len: int, a: int, w: int) -> Activations:
    """What a transformers Llama keeps for its backward: ``a`` bytes per value its matrix
    products make (the autocast dtype, else the weights'), ``w`` per weight value as the
    blocks compute with it (fp32 masters; bf16 gathered under FSDP's mixed precision). The
    residual stream has the embedding's dtype (w); where the weights are fp32 and autocast is
    on, each projection casts its own input copy and the weight it multiplies by (kept too).

    Per block and token: each RMSNorm keeps an fp32 view of its input (the block's input, then
    the residual after attention: 2 x 4 h), its normalised value (2 w h) and scale (2 x 4); the
    projections' inputs are the two norm outputs (2 w h), or five casts under autocast (5 a h);
    SDPA keeps query, key, value and output (a (2 q + 2 kv): grouped KV heads unrepeated, the
    output projection reads SDPA's output); the MLP its gate, silu(gate), up and their product
    (4 a I). Per block and sequence: attention's log-sum-exp (4 heads S). Outside the blocks:
    the final norm (4 h + w h + 4), the output layer's input (w h, or a cast: a h), the fp32
    log-probabilities (4 V), token ids and targets (16); RoPE's cos and sin (2 w S d).
    """
    casts = a < w
    h, inter, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    heads = config.num_attention_heads
    d = getattr(config, "head_dim", None) or h // heads
    q, kv = heads * d, (getattr(config, "num_key_value_heads", None) or heads) * d
    tokens = sequences * seq_len
    norm = FP32 * h + w * h + 4
    block = tokens * (2 * norm + (5 * a * h if casts else 2 * w * h) + a * (2 * q + 2 * kv) + 4 * a * inter)
    block += 4 * sequences * heads * seq_len
    top = tokens * (norm + (a if casts else w) * h + 4 * vocab + 16) + 2 * w * seq_len * d
    if casts:
        block += a * (h * (q + 2 * kv) + q * h + 3 * h * inter)
        top += a * vocab * h
    return Activations(full=layers * block + top, checkpointed=layers * tokens * w * h + top + block, block=block,
                       loss_gradient=2 * tokens * vocab * 4)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks FSDP shards one by one (a transformers decoder's ``model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def _per_rank(p: torch.Tensor, world_size: int, sharded: bool) -> int:
    """Bytes of ``p`` on one rank: all of it, or FSDP2's shard of dim 0 padded to N rows."""
    if not sharded or p.dim() == 0:
        return p.numel() * p.element_size()
    rows = p.shape[0]
    return math.ceil(rows / world_size) * (p.numel() // rows if rows else 0) * p.element_size()


def host_memory() -> int:
    """The machine's RAM (MemTotal): a CPU plan's device, and where offloaded state goes."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass  # not Linux: the page count below
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory(device: torch.device) -> int | None:
    """The device's total bytes; None for CUDA on a machine without it (a plan for elsewhere)."""
    if device.type == "cpu":
        return host_memory()
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device.index or 0).total_memory)
    return None


def plan(cfg: Config, world_size: int, model: nn.Module, device: torch.device,
         capacity: int | None = None, host_capacity: int | None = None) -> Plan:
    """The plan for one rank of ``world_size`` training ``model`` (any device, ``meta`` too) on
    ``device``; ``capacity`` and ``host_capacity`` default to the machine's own."""
    t = cfg.train
    sharded = t.sharding == "fsdp"
    params = list(model.parameters())
    weights = sum(_per_rank(p, world_size, sharded) for p in params)
    numel = sum(_per_rank(p, world_size, sharded) // p.element_size() for p in params)
    amp = amp_dtype(t.amp, device)
    # FSDP2's mixed precision gathers bf16 weights on CUDA under bf16 autocast (daemon/sharding.py).
    w = 2 if sharded and device.type == "cuda" and amp == torch.bfloat16 else FP32
    a = w if amp is None else amp.itemsize
    gathered = 0
    if sharded:
        blocks = _blocks(model)
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        root = sum(p.numel() for p in params if id(p) not in in_blocks)
        gathered = root + max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    several = world_size > 1 and not sharded  # sharded, the job is one replica: no DDP, no DiLoCo
    dense_diloco = several and t.sync == "diloco" and t.outer_compression == "none"
    config = getattr(model, "config", None)
    llama = getattr(config, "model_type", None) == "llama"
    seq_len = LmConfig.of(cfg).seq_len if llama else None
    acts = llama_activations(config, t.batch_size, seq_len, a, w) if llama and seq_len is not None else None
    rows = getattr(model, "get_input_embeddings", None)
    embedding = rows() if callable(rows) else None
    return Plan(
        world_size=world_size, device=str(device), sharded=sharded, model_class=type(model).__name__,
        parameter_count=sum(p.numel() for p in params),
        vocab=embedding.num_embeddings if isinstance(embedding, nn.Embedding) else None,
        sequences=t.batch_size, seq_len=seq_len,
        compute_dtype=str(amp or torch.float32).removeprefix("torch."),
        checkpointing=t.activation_checkpointing,
        # On the CPU the host is the device: there is nowhere to offload to.
        outer_on_host=t.outer_offload and device.type != "cpu",
        parameters=weights, gradients=weights, adamw=2 * FP32 * numel, outer=2 * weights,
        ddp_buckets=weights if several and t.sync == "ddp" else 0, gathered=gathered * w,
        gathered_grads=gathered * FP32,
        outer_step=weights * (2 if dense_diloco else 1), activations=acts,
        capacity=capacity if capacity is not None else device_memory(device),
        host_capacity=host_capacity if host_capacity is not None else host_memory(),
    )


def refusal(p: Plan) -> str | None:
    """One line saying why the plan cannot fit its CUDA device, or None (it fits, it is not
    for CUDA, or the device's size is unknown)."""
    usable, capacity = p.usable, p.capacity
    if not p.device.startswith("cuda") or usable is None or capacity is None or p.fits:
        return None
    fixes = ["lower train.batch_size"]
    if p.activations is not None and not p.checkpointing:
        fixes.append("set train.activation_checkpointing=true")
    if not p.outer_on_host:
        fixes.append("set train.outer_offload=true")
    if not p.sharded:
        fixes.append("shard over more GPUs (train.sharding=fsdp under torchrun)")
    elif p.world_size > 1:
        fixes.append("shard over more GPUs")
    return (f"memory plan: a rank needs about {p.device_total / GB:.1f} GB on {p.device}, over the "
            f"{usable / GB:.1f} GB usable of its {capacity / GB:.1f} GB ({p.margin:.0%} kept for the CUDA "
            f"context and fragmentation); {', '.join(fixes)}")


def lines(p: Plan) -> list[str]:
    """The plan as a small table, one string per line (after the GPU DIAGNOSTICS block)."""
    rule = "=" * 80
    where = "host" if p.outer_on_host else p.device
    gb = lambda v: f"{v / GB:10.2f} GB"  # noqa: E731
    sharding = f"fsdp (each rank ~1/{p.world_size})" if p.sharded else "none (every rank holds everything)"
    out = [rule, "MEMORY PLAN (per rank)", rule,
           f"World size: {p.world_size}; sharding: {sharding}; device: {p.device}",
           f"Model: {p.model_class} ({p.parameter_count / 1e6:.2f}M parameters)"]
    if p.vocab is not None:
        out.append(f"Vocabulary assumed: {p.vocab} (the embedding's rows: lm.vocab_size for the trained BPE, "
                   "else the tokenizer's or lm.init_from's)")
    if p.seq_len is not None:
        out.append(f"Micro-batch: {p.sequences} sequences x {p.seq_len} tokens, compute in {p.compute_dtype}")
    rows: list[tuple[str, int | None, str]] = [
        ("parameters (fp32 master)", p.parameters, p.device), ("gradients", p.gradients, p.device),
        ("AdamW moments (2 x fp32)", p.adamw, p.device), ("outer anchor + momentum", p.outer, where)]
    if p.ddp_buckets:
        rows.append(("DDP gradient buckets", p.ddp_buckets, p.device))
    if p.sharded:
        rows.append(("all-gathered root + 1 block, with grads", p.gathered + p.gathered_grads,
                     f"{p.device}, transient"))
    a = p.activations
    if a is None:
        rows.append(("activations", None, "not estimated for this model"))
    else:
        mark = lambda on: p.device if on == p.checkpointing else "not configured"  # noqa: E731
        rows += [("activations, no checkpointing", a.full, mark(False)),
                 ("activations, checkpointing", a.checkpointed, mark(True)),
                 ("loss gradient (backward start)", a.loss_gradient, f"{p.device}, transient")]
    rows.append(("outer step: pseudo-gradient", p.outer_step, f"{p.device}, transient"))
    out += [f"  {label:<42}{gb(v) if v is not None else '       n/a   '}  {at}" for label, v, at in rows]
    if p.usable is None:
        verdict = "device size unknown here"
    else:
        verdict = (f"{'fits' if p.fits else 'DOES NOT FIT'} in {p.usable / GB:.2f} GB usable of "
                   f"{(p.capacity or 0) / GB:.2f} GB ({p.margin:.0%} margin)")
    out.append(f"Device total: {p.device_total / GB:.2f} GB (inner step {p.inner_peak / GB:.2f}, outer step "
               f"{p.outer_peak / GB:.2f}): {verdict}")
    if p.outer_on_host:
        out.append(f"Host total: {p.host_total / GB:.2f} GB of {p.host_capacity / GB:.2f} GB (per rank: the ranks "
                   "on one machine add up)")
    if (why := refusal(p)) is not None:
        out.append(f"RED FLAG: {why}")
    out.append(rule)
    return out
