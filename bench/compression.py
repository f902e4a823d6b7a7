"""compression: DiLoCo with compressed outer syncs against the same run dense.

Two 2-rank torchrun jobs (CPU, gloo) of the tiny language model (4 layers, hidden 256,
vocabulary 8192) on standard-library sources, same seed, same inner steps, evaluated
on the same held-out set after every outer step; one averages dense pseudo-gradients,
the other sends them through the codec at its default settings (DCT, top-k 1/32 per
block, 8-bit values, error feedback).

- bytes_ratio: dense bytes over compressed bytes of one outer sync (goal >= 32).
- loss_ratio: held-out loss at the end, compressed over dense (goal <= 1.05); the
  curve of both is printed, one row per outer step.
- codec_time_ratio: encode + decode seconds over the compressed run's training time,
  outer syncs included (goal <= 0.05).
"""

from __future__ import annotations

import os
import sysconfig
import tempfile
from pathlib import Path

from bench._common import minerd_events, result

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# About 4 MB of Python: enough text that 12 outer steps do not see a sequence twice.
CORPUS = [str(STDLIB / name) for name in ("email", "http", "json", "asyncio", "concurrent", "importlib",
                                          "logging", "unittest", "xml", "urllib", "multiprocessing")]


def run(codec: str, outer_steps: int, inner: int, extra: list[str]) -> list[dict]:
    state = Path(tempfile.mkdtemp(prefix=f"bench-compression-{codec}-"))
    sets = [
        "train.task=causal_lm", "lm.preset=tiny", f"lm.corpus=[{', '.join(CORPUS)}]", "lm.seq_len=64",
        "lm.eval_fraction=0.05", "lm.eval_sequences=128", f"lm.eval_every_steps={inner}", "train.batch_size=8",
        "train.effective_batch_size=16", f"train.inner_steps_per_outer={inner}", f"train.warmup_steps={inner}",
        f"train.max_steps={outer_steps * inner}", "train.sync=diloco", f"train.outer_compression={codec}",
        "train.torch_threads=1", "api.enabled=false", "upload.enabled=false", "telemetry.log_format=json",
        "telemetry.log_every=1000", "checkpoint.every_inner_steps=100000", f"paths.state_dir={state}", *extra,
    ]
    events = minerd_events(sets, 2, f"compression ({codec})")
    return [e for e in events if e.get("rank", 0) == 0]


def evals(events: list[dict]) -> list[float]:
    return [float(e["loss"]) for e in events if str(e.get("event", "")).startswith("Eval @ step")]


def main(quick: bool) -> None:
    outer_steps, inner = (4, 10) if quick else (12, 20)
    # Settings to try another point (e.g. "compression.keep=0.0625 train.outer_lr=0.5"), both runs alike.
    extra = os.environ.get("BENCH_COMPRESSION_SETS", "").split()
    dense = run("none", outer_steps, inner, extra)
    packed = run("dct_topk", outer_steps, inner, extra)
    d_curve, c_curve = evals(dense), evals(packed)
    print(f"{'outer step':>10} {'dense loss':>11} {'compressed':>11} {'ratio':>7}")
    for i, (d, c) in enumerate(zip(d_curve, c_curve, strict=True), start=1):
        print(f"{i:>10} {d:>11.4f} {c:>11.4f} {c / d:>7.4f}")
    syncs = [e for e in packed if e.get("event") == "outer step applied"]
    stopped = next(e for e in packed if e.get("event") == "training stopped")
    codec_seconds = sum(float(e["codec_seconds"]) for e in syncs)
    dense_sync = next(e for e in dense if e.get("event") == "outer step applied")
    print(f"bytes per outer sync: dense {dense_sync['sync_bytes']:,}, compressed {syncs[0]['sync_bytes']:,}; "
          f"codec {codec_seconds:.2f}s of {stopped['train_seconds']:.1f}s training")
    result("compression", bytes_ratio=syncs[0]["sync_ratio"], loss_ratio=c_curve[-1] / d_curve[-1],
           codec_time_ratio=codec_seconds / float(stopped["train_seconds"]))
