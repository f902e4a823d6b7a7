"""Response bodies of the monitoring service, as pydantic models.

They are the ``/openapi.json`` contract that schemathesis checks and that
``minerd status`` reads. Floats that are unknown (no step yet) or not finite
(a NaN loss) are ``null``: JSON has no NaN, and a made-up 0 would look real.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class Problem(BaseModel):
    """Body of every error answer (FastAPI's ``{"detail": ...}`` shape)."""

    detail: str


class Liveness(BaseModel):
    status: Literal["ok", "stalled"]
    progress_age_seconds: float = Field(description="seconds since the last training progress (heartbeat)")
    stall_seconds: float = Field(description="watchdog.stall_seconds: older progress means stalled")
    phase: str


class Readiness(BaseModel):
    ready: bool
    phase: str
    first_step_done: bool
    reason: str | None = Field(None, description="why not ready, when the miner knows (e.g. a full disk)")


class Status(BaseModel):
    """What an operator greps for, in one JSON object."""

    version: str
    task: str
    device: str
    rank: int
    world_size: int
    local_rank: int
    phase: str = Field(description="starting | training | stopping | stopped")
    ready: bool
    paused: bool
    checkpoint_requested: bool
    upload_requested: bool
    outer_step: int
    inner_step: int
    global_step: int
    epoch: int
    last_step_time: float | None = Field(description="wall clock of the last inner step, Unix seconds")
    last_step_seconds: float | None = Field(description="wall time of the last inner step")
    loss: float | None
    learning_rate: float | None
    samples_per_second: float | None
    tokens_per_second: float | None = Field(description="tokens trained per second, whole job (language model)")
    tokens_total: int | None = Field(description="tokens trained since start (language model)")
    mfu: float | None = Field(description="model FLOPs utilisation of this device; null when its peak is unknown")
    separation_margin: float | None = Field(description="two-tower task: eval.separation_margin")
    eval: dict[str, float | None] = Field(
        description="the last evaluation as the task reports it: loss, perplexity, bits_per_byte (causal_lm); "
        "recall_at_1, recall_at_10, separation_margin (twotower); empty before the first"
    )
    eval_epoch: int | None
    eval_global_step: int | None = Field(description="the global inner step the last evaluation ran at")
    model_on_accelerator: bool
    last_checkpoint_time: float | None = Field(description="wall clock of the last checkpoint, Unix seconds")
    upload: dict[str, Any] | None = Field(description="upload state; null until the uploader exists")
    mining: dict[str, Any] | None = Field(description="mining queue health; null until mining exists")
    embeddings: dict[str, Any] | None = Field(description="embedding cache stats; null until the cache exists")
    ft: dict[str, Any] | None = Field(
        None, description="fault-tolerant outer sync (ft.enabled): phase, participants, recoveries, last sync"
    )
    compression: dict[str, Any] | None = Field(
        None, description="pseudo-gradient codec per use (upload artifact, outer sync): bytes, ratio, seconds"
    )
    uptime_seconds: float
    progress_age_seconds: float
    stall_seconds: float
    stalled: bool


ControlAction = Literal["checkpoint", "upload", "pause", "resume"]


class ControlAccepted(BaseModel):
    """The request was recorded; the training loop takes it between inner steps."""

    action: ControlAction
    accepted: bool = True
    paused: bool
    checkpoint_requested: bool
    upload_requested: bool
