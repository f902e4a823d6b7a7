"""The check's PyTorch work outside minerd, in a process of its own.

``python -m bench.gpu_check.worker SPEC_JSON`` runs one job and writes its findings as JSON
to ``spec["result"]``:

- ``kernel``: the preset's model (daemon/tasks/causal_lm/model.py) and one forward under bf16
  autocast: on CUDA with SDPA held to its flash and memory-efficient kernels (an error there means
  PyTorch would have fallen back to the math kernel), then unforced under the profiler, which
  names the attention op and kernels that ran; the logits' dtype.
- ``bare``: the bare training loop minerd is compared with: the same model, micro-batch,
  accumulation and AdamW settings (foreach and fused off, as minerd builds it), the same autocast,
  loss, clipping; random tokens already on the device, nothing else. It also holds the outer
  step's anchor and momentum on the device, as minerd's OuterOptimizer does, so that its peak
  memory is what minerd's should be.

A process of its own so that a hung CUDA call can be stopped by its pid within the check's
timeout, and so that the peak memory counted is this job's alone.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from daemon.gpu import peak_flops
from daemon.tasks.causal_lm.config import LmConfig
from daemon.tasks.causal_lm.model import build_model, flops_per_token

# Profiler event names of SDPA's implementations: the aten op each backend dispatches to.
ATTENTION_OPS = {
    "flash": "_scaled_dot_product_flash_attention",
    "efficient": "_scaled_dot_product_efficient_attention",
    "cudnn": "_scaled_dot_product_cudnn_attention",
    "math": "_scaled_dot_product_attention_math",
}


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def kernel(spec: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(spec["device"])
    model = build_model(LmConfig(preset=spec["preset"]), spec["vocab"], None, device)
    model.eval()
    ids = torch.randint(spec["vocab"], (spec["batch"], spec["seq_len"]), device=device)
    out: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            with (torch.no_grad(), _autocast(device, "bf16"),
                  sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])):
                model(input_ids=ids, use_cache=False)
            torch.cuda.synchronize()
            out["forced_error"] = None
        except RuntimeError as exc:
            out["forced_error"] = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    names: list[str] = []
    out["profiler_error"] = None
    try:  # unforced, as minerd runs it: which implementation does SDPA pick by itself?
        with torch.no_grad(), _autocast(device, "bf16"), torch.profiler.profile(activities=activities) as prof:
            logits = model(input_ids=ids, use_cache=False).logits
            if device.type == "cuda":
                torch.cuda.synchronize()
        names = sorted({event.key for event in prof.key_averages()})
    except RuntimeError as exc:  # no CUPTI, say: the forced run above still proves the kernels
        out["profiler_error"] = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        with torch.no_grad(), _autocast(device, "bf16"):
            logits = model(input_ids=ids, use_cache=False).logits
    out["attention_ops"] = sorted(kind for kind, op in ATTENTION_OPS.items() if any(op in n for n in names))
    out["attention_events"] = [n for n in names if "attention" in n.lower() or "fmha" in n.lower()
                               or "flash" in n.lower()][:12]
    out["logits_dtype"] = str(logits.dtype).removeprefix("torch.")
    return out


def bare(spec: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = build_model(LmConfig(preset=spec["preset"]), spec["vocab"], None, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"],
                            foreach=False, fused=False)
    params = list(model.parameters())
    anchor = [p.detach().clone() for p in params]  # minerd's outer state, for the memory it takes
    momentum = [torch.zeros_like(p) for p in params]
    accumulation, seq_len = spec["accumulation"], spec["seq_len"]
    batches = [torch.randint(spec["vocab"], (spec["batch"], seq_len + 1), device=device) for _ in range(accumulation)]
    tokens_per_step = accumulation * spec["batch"] * seq_len
    times: list[float] = []
    for _ in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)
        for batch in batches:
            with _autocast(device, spec["amp"]):
                logits = model(input_ids=batch[:, :-1], use_cache=False).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten()) / accumulation
            loss.backward()
            total += loss.detach()
        float(total)  # minerd reads the loss once a step: the same device sync
        if spec["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, spec["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[spec["warmup"]:])
    tokens_per_s = tokens_per_step / step
    peak = peak_flops(device)
    return {
        "tokens_per_s": tokens_per_s,
        "step_seconds": step,
        "mfu": tokens_per_s * flops_per_token(model, seq_len) / peak if peak else None,
        "peak_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        "parameters": sum(p.numel() for p in params),
        "outer_state_tensors": len(anchor) + len(momentum),
    }


JOBS = {"kernel": kernel, "bare": bare}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    result = JOBS[spec["job"]](spec)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
