"""Response bodies of the monitoring service, as pydantic models.

They are the ``/openapi.json`` contract that schemathesis checks and that
``minerd status`` reads. Floats that are unknown (no step yet) or not finite
(a NaN loss) are ``null``: JSON has no NaN, and a made-up 0 would look real.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Problem(BaseModel):
    """Body of every error answer (FastAPI's ``{"detail": ...}`` shape)."""

    detail: str


class Liveness(BaseModel):
    status: Literal["ok", "stalled", "failing"]
    progress_age_seconds: float = Field(description="seconds since the last training progress (heartbeat)")
    stall_seconds: float = Field(description="watchdog.stall_seconds: older progress means stalled")
    phase: str
    reason: str | None = Field(None, description="why training is failing though the process runs (status "
                               "failing): e.g. restored after non-finite steps, none finite since")


class Readiness(BaseModel):
    ready: bool
    phase: str
    first_step_done: bool
    reason: str | None = Field(None, description="why not ready, when the miner knows (e.g. a full disk)")


class Status(BaseModel):
    """What an operator greps for, in one JSON object.

    Beside these keys, each part of the run (the uploader, the task's mining and embedding
    cache, the outer sync, the codec) adds its own section under its name, listed in
    ``sections``: a new part's section appears without a change here.
    """

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, dict[str, Any] | None] = Field(init=False)

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
    upload: dict[str, Any] | None = Field(
        description="upload state; null where no uploader runs (upload.enabled=false, a rank other than 0)"
    )
    sections: list[str] = Field(
        description="the parts' sections this run has, each a key of this object: upload, and e.g. mining and "
        "embeddings (twotower), ft (torchft), compression (the pseudo-gradient codec)"
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
