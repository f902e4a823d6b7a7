"""The GPU DIAGNOSTICS block operators know from subnet-38 miners, with its red flags.

The same report is logged at start-up, served on ``/diagnostics`` and printed
by ``minerd diagnose`` (followed there by the memory plan, ``daemon/memory_plan.py``).
Red flags are the failure modes operators hunt for in ``pm2 logs``: no CUDA, a
model left on the CPU, suspiciously little GPU memory, and accumulation that
multiplies the work by accident.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel
from torch import nn

from daemon.config import Config

RULE = "=" * 80
# 256 accumulation steps x 4 GPUs = 1024 micro-batches per inner step made each
# step of a subnet-38 miner take minutes. Past this many we say so.
MICRO_BATCH_WARNING = 512


class Diagnostics(BaseModel):
    cuda_available: bool
    gpu_count: int
    current_device: int | None
    device_name: str | None
    gpu_total_memory_gb: float | None
    gpu_memory_allocated_gb: float | None
    model_device: str
    model_class: str | None = None  # the configured task's model, e.g. LlamaForCausalLM
    model_parameters: int | None = None
    configured_device: str
    batch_size: int
    effective_batch_size: int
    world_size: int
    gradient_accumulation_steps: int
    micro_batches_per_inner_step: int
    red_flags: list[str]
    warnings: list[str]


def accumulation_steps(cfg: Config, world_size: int) -> int:
    return cfg.train.effective_batch_size // (cfg.train.batch_size * world_size)


def collect(cfg: Config, model_device: torch.device, world_size: int, model: nn.Module | None = None) -> Diagnostics:
    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    current = torch.cuda.current_device() if cuda else None
    name = torch.cuda.get_device_name(current) if cuda and current is not None else None
    total = allocated = None
    if cuda and current is not None:
        total = torch.cuda.get_device_properties(current).total_memory / 1e9
        allocated = torch.cuda.memory_allocated(current) / 1e9
    accum = accumulation_steps(cfg, world_size)
    micro = accum * world_size
    expects_gpu = cfg.train.device != "cpu"
    red: list[str] = []
    warn: list[str] = []
    if not cuda and expects_gpu:
        red.append("CUDA NOT AVAILABLE - Model will run on CPU (VERY SLOW!)")
    if model_device.type == "cpu" and expects_gpu:
        red.append("Model is on CPU! This will be EXTREMELY SLOW!")
    if (
        model_device.type == "cuda"
        and allocated is not None
        and allocated < cfg.telemetry.low_gpu_memory_gb
        and expects_gpu
    ):
        warn.append("LOW GPU MEMORY: Model may be on CPU!")
    per_step = cfg.train.batch_size * world_size
    if cfg.train.effective_batch_size % per_step:
        # Only when planning another world size than the launch's: the launch's own is a config error.
        warn.append(f"train.effective_batch_size ({cfg.train.effective_batch_size}) is not a multiple of "
                    f"train.batch_size x {world_size} ranks = {per_step}: a job of {world_size} ranks refuses it")
    if micro > MICRO_BATCH_WARNING:
        warn.append(
            f"{accum} accumulation steps x {world_size} GPUs = {micro} micro-batches per inner step: "
            "each inner step runs that many forward/backward passes; lower train.effective_batch_size "
            "if steps are slow"
        )
    return Diagnostics(
        cuda_available=cuda,
        gpu_count=count,
        current_device=current,
        device_name=name,
        gpu_total_memory_gb=round(total, 2) if total is not None else None,
        gpu_memory_allocated_gb=round(allocated, 2) if allocated is not None else None,
        model_device=str(model_device),
        model_class=type(model).__name__ if model is not None else None,
        model_parameters=sum(p.numel() for p in model.parameters()) if model is not None else None,
        configured_device=cfg.train.device,
        batch_size=cfg.train.batch_size,
        effective_batch_size=cfg.train.effective_batch_size,
        world_size=world_size,
        gradient_accumulation_steps=accum,
        micro_batches_per_inner_step=micro,
        red_flags=red,
        warnings=warn,
    )


def render(d: Diagnostics) -> list[str]:
    """The block as operators know it from their miners' logs, one string per line."""
    gb = lambda v: f"{v:.2f} GB" if v is not None else "n/a"  # noqa: E731
    lines = [
        RULE,
        "GPU DIAGNOSTICS",
        RULE,
        f"CUDA available: {d.cuda_available}",
        f"GPU count: {d.gpu_count}",
        f"Current CUDA device: {d.current_device if d.current_device is not None else 'n/a'}",
        f"Device name: {d.device_name or 'n/a'}",
        f"GPU total memory: {gb(d.gpu_total_memory_gb)}",
        f"GPU memory allocated: {gb(d.gpu_memory_allocated_gb)}",
        # meta: `minerd diagnose --world-size N` for another world size built shapes only.
        "Model device: " + ("not built (shapes only, for the memory plan)" if d.model_device == "meta"
                            else d.model_device),
    ]
    if d.model_class is not None and d.model_parameters is not None:
        lines.append(f"Model: {d.model_class} ({d.model_parameters / 1e6:.2f}M parameters)")
    if d.model_device.startswith("cuda"):
        lines.append(f"Model correctly on GPU: {d.model_device}")
    elif d.configured_device == "cpu":
        lines.append("Model on CPU as configured (train.device=cpu)")
    lines += [
        f"Batch size (per GPU): {d.batch_size}",
        f"Effective batch size (total): {d.effective_batch_size}",
        f"World size (GPUs): {d.world_size}",
        f"Gradient accumulation steps: {d.gradient_accumulation_steps}",
        f"Total micro-batches per inner step: {d.gradient_accumulation_steps} x {d.world_size} = "
        f"{d.micro_batches_per_inner_step}",
    ]
    lines += [f"RED FLAG: {flag}" for flag in d.red_flags]
    lines += [f"WARNING: {w}" for w in d.warnings]
    lines.append(RULE)
    return lines
