"""lm: the language model's training loop against a bare PyTorch loop.

The default job as ``make run`` trains it (the tiny Llama on the standard library,
uploads, checkpoints and step telemetry at their configured cadence) runs in blocks
of inner steps through minerd's own loop (``Trainer.run``), alternating with blocks of
a bare loop in the same process: a copy of the same model and optimizer settings on
the same batches, forward, loss, backward, clip, step, nothing else. Evaluations are
left out of both (they are not training; the run reports them on their own). Each
minerd block ends when its last upload is published, so the publisher's work is
charged to minerd, never to the bare block after it.

- tokens_per_s: minerd's loop, tokens per second.
- loop_over_bare: minerd's tokens/s over the bare loop's (goal >= 0.97).
- mfu: model FLOPs utilisation, where the device's peak is known (nan on a CPU).

``--curve`` instead trains the default job for ten minutes (five with ``--quick``),
evaluating every 25 steps, and draws the held-out loss into docs/lm-loss-curve.png.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog
import torch
import torch.nn.functional as F

from bench._common import interleaved, result
from daemon.run.lifecycle import Lifecycle
from daemon.run.local import cpu_run
from daemon.state import MinerState
from daemon.tasks.causal_lm.config import LmConfig
from daemon.upload import Uploader

ROOT = Path(__file__).resolve().parent.parent
CURVE_PNG = ROOT / "docs" / "lm-loss-curve.png"


class _Budget:
    """The trainer's stop seam: asks it to stop once the run reaches a global step."""

    def __init__(self, state: MinerState) -> None:
        self.state = state
        self.until = 0

    @property
    def requested(self) -> bool:
        return self.state.global_step >= self.until

    def abandon_partial_step(self) -> bool:
        return False


def main(quick: bool) -> None:
    if "--curve" in sys.argv:
        curve(quick)
        return
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    tmp = Path(tempfile.mkdtemp(prefix="bench-lm-"))
    state = MinerState(task="causal_lm")
    budget = _Budget(state)
    # The default job, as `make run` configures it; only evaluations are pushed out of reach.
    sets = [f"paths.state_dir={tmp}", "lm.eval_every_steps=1000000", "api.enabled=false"]
    if quick:  # uploads from the 6th step rather than the 50th: the warm-up fits in the quick budget
        sets.append("upload.min_inner_step=6")
    run, registry, state = cpu_run(sets, state=state, stop=budget)
    trainer = run.trainer
    life = Lifecycle()
    for component in run.components:
        life.start(component)
    cfg = trainer.cfg
    task = run.task
    seq_len = LmConfig.of(cfg).seq_len
    bare_model = copy.deepcopy(trainer.model)
    bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                 foreach=False, fused=False)
    sampler = run.sampler
    position = {"epoch": 1, "index": sampler.batches_per_epoch // 2}  # the bare loop reads its own stretch
    steps = 6 if quick else 16
    tokens_per_step = cfg.train.effective_batch_size * seq_len

    uploader = next((c for c in run.components if isinstance(c, Uploader)), None)

    def minerd() -> None:
        budget.until = trainer.progress.global_step + steps
        trainer.run()
        # The block's last upload is finished inside the block: left running, its serialising
        # would be charged to the bare loop's block that follows.
        if uploader is not None:
            uploader.wait_idle(120)

    def bare() -> None:
        from daemon.engine.protocols import BatchPos

        bare_model.train()
        for _ in range(steps):
            for _ in range(run.accumulation):
                if position["index"] >= sampler.batches_per_epoch:
                    position["epoch"] += 1
                    position["index"] = 0
                pos = BatchPos(position["epoch"], position["index"])
                position["index"] += 1
                batch = task.get_batch(sampler.batch(pos.epoch, pos.index), run.device, pos)
                logits = bare_model(input_ids=batch[:, :-1], use_cache=False).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten()) / run.accumulation
                loss.backward()
            torch.nn.utils.clip_grad_norm_(bare_model.parameters(), cfg.train.grad_clip)
            bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)

    # Warm-up: both loops once, so allocator and caches are warm; the gate passes
    # upload.min_inner_step so that uploads run at their configured cadence throughout.
    budget.until = cfg.upload.min_inner_step
    trainer.run()
    bare()
    t_minerd, t_bare = interleaved(minerd, bare, 3 if quick else 6)
    life.stop_all(30)
    tps, tps_bare = steps * tokens_per_step / t_minerd, steps * tokens_per_step / t_bare
    mfu = state.mfu if state.mfu is not None else math.nan
    print(f"{'loop':<10}{'s/step':>10}{'tokens/s':>12}")
    print(f"{'minerd':<10}{t_minerd / steps:>10.3f}{tps:>12.0f}\n{'bare':<10}{t_bare / steps:>10.3f}{tps_bare:>12.0f}")
    print(f"checkpoints {registry.get_sample_value('minerd_checkpoints_total'):.0f}, uploads "
          f"{registry.get_sample_value('minerd_upload_attempts_total', {'result': 'ok'}):.0f}; "
          f"tokens/step {tokens_per_step}")
    result("lm", tokens_per_s=tps, loop_over_bare=tps / tps_bare, mfu=mfu)


def curve(quick: bool) -> None:
    """Train the default job for a fixed time, evaluating every 25 steps; draw the curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    tmp = Path(tempfile.mkdtemp(prefix="bench-lm-curve-"))
    run, _, _ = cpu_run([f"paths.state_dir={tmp}", "lm.eval_every_steps=25", "upload.enabled=false",
                             "api.enabled=false"])
    trainer = run.trainer
    from daemon.engine.protocols import EvalPoint

    points = [(0, 0.0, run.task.evaluate(trainer.model, run.device, EvalPoint(1, 0), lambda: None).metrics)]
    seq_len = LmConfig.of(trainer.cfg).seq_len
    seconds = 300 if quick else 600
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        trainer.inner_step()
        at = trainer.progress.global_step
        if at % 25 == 0:
            points.append((at, time.monotonic() - t0, dict(trainer.last_eval)))
            print(f"step {at:5d}  {time.monotonic() - t0:6.0f}s  "
                  f"loss {trainer.last_eval['loss']:.3f}  bpb {trainer.last_eval['bits_per_byte']:.3f}", flush=True)
    steps_done = [p[0] for p in points]
    losses = [p[2]["loss"] for p in points]
    # Bits per byte is the loss times one constant (1 / ln 2 / bytes per held-out token): one
    # line, read in nats on the left and in bits per byte on the right.
    k = points[-1][2]["bits_per_byte"] / points[-1][2]["loss"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps_done, losses, marker="o", markersize=3)
    for step, loss in (points[0][0], points[0][2]["loss"]), (points[-1][0], points[-1][2]["loss"]):
        ax.annotate(f"{loss:.2f}", (step, loss), textcoords="offset points", xytext=(4, 6))
    def to_bpb(x: Any) -> Any:
        return x * k

    def to_loss(y: Any) -> Any:
        return y / k

    ax.secondary_yaxis("right", functions=(to_bpb, to_loss)).set_ylabel("bits per byte")
    ax.set_xlabel(f"inner step ({trainer.cfg.train.effective_batch_size} sequences x {seq_len} tokens)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"minerd causal_lm tiny on the Python standard library, {seconds // 60} min on 2 CPU cores",
                 fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(CURVE_PNG)
    first, last = points[0][2], points[-1][2]
    print(f"wrote {CURVE_PNG}: {len(points)} evaluations over {steps_done[-1]} steps")
    tokens = steps_done[-1] * trainer.cfg.train.effective_batch_size * seq_len
    result("lm", tokens_per_s=tokens / (time.monotonic() - t0), loss_start=first["loss"], loss_end=last["loss"],
           bpb_end=last["bits_per_byte"], steps=steps_done[-1])
