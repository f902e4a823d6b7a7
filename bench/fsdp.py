"""fsdp: a sharded language model over two ranks against DDP, and compiled blocks against eager.

Two torchrun ranks on CPU (gloo) train the tiny Llama from the same seed on the same
data, once under DDP (every rank holds the whole model) and once sharded with FSDP2
(``train.sharding=fsdp``), DiLoCo's outer step every 7 inner steps in both.

- state_bytes_ratio: per-rank bytes of parameters + gradients + AdamW state + outer
  anchor and momentum with fsdp over DDP, as the ranks report them at the end (goal
  <= 0.55 at 2 ranks: one half, plus the few tensors that are not split).
- step_time_ratio: median inner-step time with fsdp over DDP (a report: on CPU with gloo
  the gathers and reduce-scatters cost what a GPU's NVLink would hide).
- loss_match: the largest relative difference of the first 20 losses of the two runs, on
  both ranks (goal <= 1e-3).
- compile_speedup_cpu: tokens/s with ``train.compile`` over without, one process, the tiny
  preset at the language model's defaults, the first steps (compiling) left out.
"""

from __future__ import annotations

import statistics
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from bench._common import minerd_events, result

CORPUS = [str(Path(sysconfig.get_paths()["stdlib"]) / name) for name in ("email", "http", "json")]
SHARED = [
    "train.task=causal_lm", f"lm.corpus=[{', '.join(CORPUS)}]", "lm.vocab_size=1024", "lm.seq_len=64",
    "lm.eval_fraction=0.1",
    "train.batch_size=8", "train.effective_batch_size=16", "train.inner_steps_per_outer=7", "train.warmup_steps=2",
    "train.torch_threads=1", "api.enabled=false", "upload.enabled=false", "telemetry.log_format=json",
    "checkpoint.every_inner_steps=100000", "lm.eval_every_steps=100000",
]


def _run(world: int, steps: int, sets: list[str], what: str) -> list[dict[str, Any]]:
    state = Path(tempfile.mkdtemp(prefix="bench-fsdp-"))
    return minerd_events([*sets, f"paths.state_dir={state}", f"train.max_steps={steps}"], world, what, timeout=1800)


def _steps(events: list[dict[str, Any]], rank: int = 0) -> list[dict[str, Any]]:
    return sorted((e for e in events if "loss" in e and "global_step" in e and "step_seconds" in e
                   and e.get("rank", 0) == rank), key=lambda e: e["global_step"])


def _state_bytes(events: list[dict[str, Any]]) -> int:
    stops = [e for e in events if e.get("event") == "training stopped"]
    keys = ("param_bytes", "grad_bytes", "optimizer_bytes", "outer_bytes")
    return max(sum(int(e[k]) for k in keys) for e in stops)  # the larger rank's


def main(quick: bool) -> None:
    steps = 30 if quick else 60
    ddp = _run(2, steps, [*SHARED, "train.sync=ddp"], "DDP over 2 ranks")
    fsdp = _run(2, steps, [*SHARED, "train.sharding=fsdp"], "FSDP over 2 ranks")
    worst = 0.0
    for rank in (0, 1):
        a, b = _steps(ddp, rank)[:20], _steps(fsdp, rank)[:20]
        assert [e["global_step"] for e in a] == [e["global_step"] for e in b]
        worst = max(worst, *(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b, strict=True)))
    t_ddp = statistics.median(e["step_seconds"] for e in _steps(ddp)[5:])
    t_fsdp = statistics.median(e["step_seconds"] for e in _steps(fsdp)[5:])
    b_ddp, b_fsdp = _state_bytes(ddp), _state_bytes(fsdp)

    # The language model's own defaults (the tiny preset, 16 sequences of 256 tokens), one process.
    csteps = 20 if quick else 40
    one = ["train.task=causal_lm", "train.torch_threads=2", "api.enabled=false", "upload.enabled=false",
           "telemetry.log_format=json", "checkpoint.every_inner_steps=100000", "lm.eval_every_steps=100000"]
    eager = _run(1, csteps, one, "eager blocks")
    compiled = _run(1, csteps, [*one, "train.compile=true"], "compiled blocks")
    skip = 5  # the first steps compile (and warm the allocator for both)
    tps_eager = statistics.median(e["tokens_per_s"] for e in _steps(eager)[skip:])
    tps_compiled = statistics.median(e["tokens_per_s"] for e in _steps(compiled)[skip:])

    print(f"{'run':<28}{'state MB/rank':>14}{'step s':>10}{'tokens/s':>10}")
    print(f"{'DDP, 2 ranks':<28}{b_ddp / 1e6:>14.2f}{t_ddp:>10.3f}{'':>10}")
    print(f"{'FSDP, 2 ranks':<28}{b_fsdp / 1e6:>14.2f}{t_fsdp:>10.3f}{'':>10}")
    print(f"{'tiny, eager, 1 process':<28}{'':>14}{'':>10}{tps_eager:>10.0f}")
    print(f"{'tiny, compiled, 1 process':<28}{'':>14}{'':>10}{tps_compiled:>10.0f}")
    print(f"first 20 losses, largest relative difference: {worst:.2e}", file=sys.stdout)
    result("fsdp", state_bytes_ratio=b_fsdp / b_ddp, step_time_ratio=t_fsdp / t_ddp, loss_match=worst,
           compile_speedup_cpu=tps_compiled / tps_eager)
