"""One model held by the ranks of a job together (``train.sharding=fsdp``), and the block
options every run may use (``train.activation_checkpointing``, ``train.compile``).

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) each decoder block, and then the model
itself, is split along its parameters' first dimension: every rank keeps one slice of each
parameter, of its gradient and of its AdamW moments, and a block's whole parameters exist
only while that block computes (gathered before, freed after). The parameters become
``DTensor``s; what a rank holds of one is ``local(p)``. The ranks' gradients are reduced into
their slices at every inner step, so the job trains one model, as under DDP, at a fraction of
the memory per rank.

On CUDA with bf16 autocast the gathered parameters are bf16 and the gradients are reduced in
fp32 (FSDP2's mixed-precision policy): the master weights and the optimizer stay fp32.

Reading the whole model back (an upload revision, a test's digest) is a collective: every
rank takes part, rank 0 gets the tensors, in host memory (never a whole copy on the GPU).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import structlog
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

log = structlog.get_logger(__name__)


def local(t: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``t``: its shard of a sharded tensor, else ``t`` itself (the same
    memory: writing into it writes the parameter)."""
    return t.to_local() if isinstance(t, DTensor) else t


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def local_tree(tree: Any) -> Any:
    """``tree`` with every sharded tensor replaced by this rank's shard (state for a peer of the
    same rank in another replica group, which holds the same slices)."""
    if isinstance(tree, DTensor):
        return tree.to_local()
    if isinstance(tree, dict):
        return {k: local_tree(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(local_tree(v) for v in tree)
    return tree


def prepare_blocks(model: nn.Module, blocks: Sequence[nn.Module], checkpointing: bool, compile_blocks: bool) -> None:
    """Activation checkpointing and ``torch.compile``, each per block, as torchtitan does.

    Checkpointing keeps only each block's input and recomputes the rest in the backward pass
    (non-reentrant, which FSDP2 and compile both support). Compiling the repeated block, not
    the whole model, compiles one graph that every block reuses, in seconds rather than
    minutes, and leaves the model's own code (the loss, the embeddings) eager.
    """
    if checkpointing:
        # transformers 5 renamed it; 4.x has only the old name.
        new = getattr(model, "activation_checkpointing_enable", None)
        old = getattr(model, "gradient_checkpointing_enable", None)
        if new is not None:
            new(activation_checkpointing_kwargs={"use_reentrant": False})
        elif old is not None:
            old(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            raise ValueError(f"{type(model).__name__} has no per-block activation checkpointing")
    if compile_blocks:
        for block in blocks:
            block.compile()  # in place: the state dict's keys stay those of the plain model


def shard_model(model: nn.Module, blocks: Sequence[nn.Module], device: torch.device,
                amp_dtype: torch.dtype | None) -> None:
    """Shard each block, then the root (the embeddings, the final norm and the output layer);
    the root's parameters stay gathered from the end of the forward pass to the backward's
    first use, which saves one gather per step."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if device.type == "cuda" and amp_dtype == torch.bfloat16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters left after a forward pass with no backward (an evaluation):
    FSDP2 keeps the root's gathered until the backward that never comes, and until then the
    model's parameters are whole tensors, not this rank's slices."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def gradient_sync(model: nn.Module, on: bool) -> None:
    """Reduce gradients after this backward (the last micro-batch of an inner step) or not
    (accumulating): FSDP2's counterpart of DDP's ``no_sync``."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(on)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters this rank holds, parameters of the model); tied weights once."""
    params = list(model.parameters())
    return sum(local(p).numel() for p in params), sum(p.numel() for p in params)


def describe(model: nn.Module, world_size: int) -> str:
    mine, total = parameter_counts(model)
    return f"Sharding: fsdp over {world_size} ranks: {mine / 1e6:.2f}M of {total / 1e6:.2f}M parameters on this rank"


def unique_names(model: nn.Module) -> list[str]:
    """State-dict keys of the model's tensors, tied weights once (under their first name)."""
    every = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    once = {n for n, _ in model.named_parameters()}
    dropped = set(every) - once
    return [k for k in model.state_dict() if k not in dropped]


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0, in host memory (tied weights once); an empty dict on
    the other ranks. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    names = unique_names(model)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    return {k: cast(torch.Tensor, full[k]) for k in names if k in full}


def whole_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole weights (tied weights once): gathered to rank 0 when it is sharded (every
    rank must call it then), else the model's own tensors."""
    if is_sharded(model):
        return full_weights(model)
    state = model.state_dict()
    return {k: state[k] for k in unique_names(model)}


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """A digest of whole weights, the same for a sharded model gathered and for the same model
    unsharded (tests compare checkpoints, revisions and resumed runs of different world sizes)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def full_tensors(like: Iterable[tuple[str, torch.Tensor]], values: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors, in host memory on rank 0 (an empty dict elsewhere), from this rank's shards
    ``values`` of the parameters ``like`` (name, parameter): one parameter gathered at a time, so
    the device never holds more than one whole parameter. Every rank must call it."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    out: dict[str, torch.Tensor] = {}
    for (name, p), v in zip(like, values, strict=True):
        if isinstance(p, DTensor):
            whole = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, shape=p.shape,
                                       stride=p.stride(), run_check=False).full_tensor()
        else:
            whole = v
        if rank0:
            out[name] = whole.detach().to("cpu", copy=True)
    return out


def any_nonfinite(tensors: Iterable[torch.Tensor], device: torch.device) -> bool:
    """True on every rank when a NaN or infinity sits in any rank's shard of ``tensors``."""
    sums = [local(t).detach().float().sum() for t in tensors if t.is_floating_point()]
    bad = bool(sums) and not bool(torch.isfinite(torch.stack([s.to(device) for s in sums])).all())
    if not dist.is_initialized():
        return bad
    flag = torch.tensor([1 if bad else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
