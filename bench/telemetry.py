"""telemetry: training steps with step logging, metrics and diagnostics on / off.

The same trainer runs alternately with the step reporter live (a JSON step
line every step to a file, counters, histogram, the heartbeat) and with a
reporter that does nothing. overhead = on / off - 1 (goal <= 0.02).

The corpus is large enough that no block reaches an epoch's end: an evaluation
landing in one variant's blocks skewed an A/A run (both variants live) by 2-5%;
with no evaluation in sight the same A/A run reads 0.3%.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench._common import interleaved, result
from daemon import diagnostics
from daemon.logsetup import configure_logging
from daemon.run.local import cpu_run


class _Silent:
    def report(self, *args: object, **kwargs: object) -> None:
        return None


def main(quick: bool) -> None:
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-telemetry-"))
    log_file = (tmp / "steps.log").open("w")
    configure_logging("json", "info", stream=log_file)
    trainer = cpu_run([
        "train.task=twotower", "twotower.corpus=synthetic", f"paths.state_dir={tmp}", "twotower.num_docs=400000",
        "twotower.eval_queries=100",
        "twotower.hidden_dim=512", "train.batch_size=256", "mining.enabled=false", "upload.enabled=false",
        "telemetry.log_every=1",
    ])[0].trainer
    cfg = trainer.cfg
    live = trainer.reporter
    silent = _Silent()
    steps = 20 if quick else 60
    diag = diagnostics.collect(cfg, torch.device("cpu"), 1)
    log = logging.getLogger("bench")

    def block(reporter: object) -> float:
        """Seconds of ``steps`` inner steps, leaving out a step that ends an epoch: its
        evaluation would land in one variant's block or the other's by chance."""
        trainer.reporter = reporter  # type: ignore[assignment]
        spent = 0.0
        for _ in range(steps):
            epoch = trainer.progress.epoch
            t0 = time.perf_counter()
            trainer.inner_step()
            if trainer.progress.epoch == epoch:
                spent += time.perf_counter() - t0
        return spent

    times: dict[str, list[float]] = {"on": [], "off": []}

    def on() -> None:
        t0 = time.perf_counter()
        for line in diagnostics.render(diag):  # the start-up block, as each run logs it once
            log.info(line)
        times["on"].append(time.perf_counter() - t0 + block(live))

    def off() -> None:
        times["off"].append(block(silent))

    block(silent)  # warm-up
    interleaved(on, off, 5 if quick else 15)
    t_on, t_off = statistics.median(times["on"]), statistics.median(times["off"])
    print(f"{'variant':<20}{'seconds/' + str(steps) + ' steps':>20}")
    print(f"{'telemetry on':<20}{t_on:>20.4f}\n{'telemetry off':<20}{t_off:>20.4f}")
    result("telemetry", overhead=t_on / t_off - 1)
