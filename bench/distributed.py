"""distributed: two ranks under torchrun against one, and DDP's traffic against DiLoCo's.

- samples_ratio_2_over_1: samples/s of the job with 2 CPU ranks (gloo) over
  1 process, same per-rank batch. On a 2-core machine both ranks share the
  cores, so this reports the cost of the machinery, not a scaling result.
- bytes_ratio_ddp_over_diloco: bytes each rank sends into collectives per
  inner step with DDP (gradients every inner step) over DiLoCo
  (pseudo-gradients once per outer step). Dense traffic alone would give
  inner_steps_per_outer; the ID-embedding rows all-gathered every inner step
  (both modes) bring it below that. bytes_ratio_dense_only reports the dense part.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench._common import minerd_events, result

ROOT = Path(__file__).resolve().parent.parent
COMMON = [
    "train.task=twotower", "twotower.corpus=synthetic", "twotower.num_docs=16384", "twotower.eval_queries=64",
    "twotower.dim=64",
    "twotower.hidden_dim=256",
    "twotower.embed_dim=64", "train.batch_size=128", "train.inner_steps_per_outer=10", "train.warmup_steps=5",
    "api.enabled=false", "upload.enabled=false", "mining.enabled=false", "telemetry.log_format=json",
    "telemetry.log_every=1000", "checkpoint.every_inner_steps=100000", "train.torch_threads=1",
]


def run(world: int, sync: str, steps: int, *extra: str) -> dict:
    state = Path(tempfile.mkdtemp(prefix=f"bench-dist-{world}-{sync}-"))
    sets = [*COMMON, f"paths.state_dir={state}", f"train.sync={sync}", f"train.max_steps={steps}",
            f"train.effective_batch_size={128 * world}", *extra]
    events = minerd_events(sets, world, f"distributed ({world}, {sync})", timeout=600)
    return next(e for e in events if e.get("event") == "training stopped" and e.get("rank", 0) == 0)


def main(quick: bool) -> None:
    steps = 30 if quick else 100
    one = run(1, "diloco", steps)
    ddp = run(2, "ddp", steps)
    diloco = run(2, "diloco", steps)
    dense = {sync: run(2, sync, 20, "embeddings.enabled=false")["comm_bytes"] for sync in ("ddp", "diloco")}
    sps = {name: r["samples"] / r["train_seconds"] for name, r in (("1", one), ("ddp", ddp), ("diloco", diloco))}
    bytes_per_step = {name: r["comm_bytes"] / steps for name, r in (("ddp", ddp), ("diloco", diloco))}
    print(f"{'run':<22}{'samples/s':>12}{'bytes/inner step':>20}")
    print(f"{'1 process':<22}{sps['1']:>12.0f}{0:>20}")
    print(f"{'2 ranks, ddp':<22}{sps['ddp']:>12.0f}{bytes_per_step['ddp']:>20.0f}")
    print(f"{'2 ranks, diloco':<22}{sps['diloco']:>12.0f}{bytes_per_step['diloco']:>20.0f}")
    result(
        "distributed",
        samples_ratio_2_over_1=sps["diloco"] / sps["1"],
        bytes_ratio_ddp_over_diloco=bytes_per_step["ddp"] / bytes_per_step["diloco"],
        samples_ratio_ddp_2_over_1=sps["ddp"] / sps["1"],
        bytes_ratio_dense_only=dense["ddp"] / dense["diloco"],
    )
