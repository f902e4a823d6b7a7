"""Step telemetry in the logs: the lines operators already grep for.

    Outer Step: 56 | Inner Step: 84 | LR: 0.00002100 | Loss: 3.40 | Step Time: 15.2s | GPU Mem: 18.45GB
    SLOW STEP: 245.7s (expected 10-30s) - Check GPU usage!
    LOW GPU MEMORY: Model may be on CPU!
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
import torch
from prometheus_client import Counter

from daemon.config import TelemetryConfig
from daemon.gpu import GpuProbe
from daemon.metrics import CoreMetrics

log = structlog.get_logger("minerd.train")

LOW_MEMORY_EVERY = 100  # steps between repeats of the low-memory warning


def format_step_time(seconds: float) -> str:
    # The step lines operators grep read "15.2s"; short steps (small models, CPU tests) keep more digits.
    if seconds >= 10:
        return f"{seconds:.1f}s"
    return f"{seconds:.2f}s" if seconds >= 1 else f"{seconds:.3f}s"


def step_line(outer: int, inner: int, lr: float, loss: float, seconds: float, gpu_gb: float) -> str:
    return (
        f"Outer Step: {outer} | Inner Step: {inner} | LR: {lr:.8f} | Loss: {loss:.2f} | "
        f"Step Time: {format_step_time(seconds)} | GPU Mem: {gpu_gb:.2f}GB"
    )


@dataclass
class Throughput:
    """Tokens per second and model FLOPs utilisation of a step, for tasks that count tokens.

    MFU is this device's share of the job's tokens per second times the model's training
    FLOPs per token, over the device's peak: unknown peak (a CPU, an unlisted GPU with no
    ``telemetry.peak_tflops``) means MFU is not reported rather than guessed.
    """

    tokens_per_sample: int | None = None
    flops_per_token: float | None = None
    peak_flops: float | None = None  # per device
    tokens: Counter | None = None  # minerd_tokens_total
    tokens_total: int = 0  # since start, as the counter holds it

    def measure(self, samples: int, seconds: float, world_size: int) -> dict[str, float]:
        """``samples`` over the whole job in ``seconds``: {tokens_per_s, mfu} as known."""
        if self.tokens_per_sample is None:
            return {}
        tokens = samples * self.tokens_per_sample
        self.tokens_total += tokens
        if self.tokens is not None:
            self.tokens.inc(tokens)
        if seconds <= 0:
            return {}
        out = {"tokens_per_s": round(tokens / seconds, 1)}
        if self.flops_per_token and self.peak_flops:
            out["mfu"] = round(tokens / seconds / world_size * self.flops_per_token / self.peak_flops, 5)
        return out


class StepReporter:
    def __init__(self, cfg: TelemetryConfig, metrics: CoreMetrics, device: torch.device) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.device = device
        self._low_memory_last: int | None = None

    def report(
        self,
        global_step: int,
        outer: int,
        inner: int,
        lr: float,
        loss: float,
        seconds: float,
        samples: int,
        **extra: object,
    ) -> None:
        m = self.metrics
        m.inner_steps.inc()
        m.samples.inc(samples)
        m.step_duration.observe(seconds)
        gpu_gb = GpuProbe.allocated_gb(self.device)
        if global_step % self.cfg.log_every == 0:
            log.info(
                step_line(outer, inner, lr, loss, seconds, gpu_gb),
                line=True,
                outer_step=outer,
                inner_step=inner,
                global_step=global_step,
                lr=lr,
                loss=loss,
                step_seconds=round(seconds, 4),
                gpu_mem_gb=round(gpu_gb, 3),
                **extra,
            )
        if seconds > self.cfg.slow_step_seconds:
            m.slow_steps.inc()
            # The expected band scales with the threshold: 10-30s at the default 60 s, the band operators know.
            slow = self.cfg.slow_step_seconds
            log.warning(
                f"SLOW STEP: {seconds:.1f}s (expected {slow / 6:g}-{slow / 2:g}s) - Check GPU usage!",
                line=True,
                step_seconds=round(seconds, 3),
                global_step=global_step,
            )
        if self.device.type == "cuda" and gpu_gb < self.cfg.low_gpu_memory_gb and (
            self._low_memory_last is None or global_step - self._low_memory_last >= LOW_MEMORY_EVERY
        ):
            self._low_memory_last = global_step
            log.warning("LOW GPU MEMORY: Model may be on CPU!", line=True, gpu_mem_gb=round(gpu_gb, 3))
