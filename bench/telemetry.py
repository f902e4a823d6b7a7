"""telemetry: training steps with step logging, metrics and diagnostics on / off.

The same trainer runs alternately with the step reporter live (a JSON step
line every step to a file, counters, histogram, the heartbeat) and with a
reporter that does nothing. overhead = on / off - 1 (goal <= 0.02).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from bench._common import interleaved, result
from daemon import diagnostics
from daemon.config import load_config
from daemon.gpu import GpuProbe
from daemon.logsetup import configure_logging
from daemon.metrics import build_core_metrics
from daemon.state import MinerState
from daemon.training.build import Launch, build_trainer


class _NoStop:
    requested = False

    def abandon_partial_step(self) -> bool:
        return False


class _Silent:
    def report(self, *args: object, **kwargs: object) -> None:
        return None


def main(quick: bool) -> None:
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-telemetry-"))
    log_file = (tmp / "steps.log").open("w")
    configure_logging("json", "info", stream=log_file)
    cfg = load_config(
        sets=[
            f"paths.state_dir={tmp}", "data.num_docs=50000", "data.eval_queries=100", "train.hidden_dim=512",
            "train.batch_size=256", "mining.enabled=false", "upload.enabled=false", "telemetry.log_every=1",
        ],
        environ={},
    )
    state = MinerState()
    metrics = build_core_metrics(CollectorRegistry(), state, GpuProbe())
    trainer, _ = build_trainer(cfg, state, metrics, _NoStop(), Launch(), torch.device("cpu"))
    live = trainer.reporter
    silent = _Silent()
    steps = 20 if quick else 60
    diag = diagnostics.collect(cfg, torch.device("cpu"), 1)
    log = logging.getLogger("bench")

    def on() -> None:
        trainer.reporter = live
        for line in diagnostics.render(diag):  # the start-up block, as each run logs it once
            log.info(line)
        for _ in range(steps):
            trainer.inner_step()

    def off() -> None:
        trainer.reporter = silent  # type: ignore[assignment]
        for _ in range(steps):
            trainer.inner_step()

    off()  # warm-up
    t_on, t_off = interleaved(on, off, 5 if quick else 9)
    print(f"{'variant':<20}{'seconds/' + str(steps) + ' steps':>20}")
    print(f"{'telemetry on':<20}{t_on:>20.4f}\n{'telemetry off':<20}{t_off:>20.4f}")
    result("telemetry", overhead=t_on / t_off - 1)
