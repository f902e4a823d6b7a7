"""The upload gate: a pure decision, from the miner's state, whether to publish now.

Validators reject revisions with too few inner steps, non-finite weights and an
inner step that does not increase; the miner refuses those itself and says why.
Checks run in a fixed order so the reason is stable: disabled, not_on_schedule,
min_interval, min_inner_step, in_progress, not_newer, nonfinite. The schedule is
checked before the minimum (as subnet-38 miners do), so below the minimum only
the scheduled steps (3, 6, ... 48 with every 3) count as blocked attempts.

``upload.min_interval_seconds`` is a time floor under the step schedule: a
schedule made for 15-second GPU steps would publish several revisions a
second from a fast CPU job, for nothing (validators look at the newest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from daemon.config import UploadConfig

OK = "ok"
DISABLED = "disabled"
NOT_ON_SCHEDULE = "not_on_schedule"
TOO_SOON = "min_interval"
MIN_INNER_STEP = "min_inner_step"
IN_PROGRESS = "in_progress"
NOT_NEWER = "not_newer"
NONFINITE = "nonfinite"

REASONS = (DISABLED, NOT_ON_SCHEDULE, TOO_SOON, MIN_INNER_STEP, IN_PROGRESS, NOT_NEWER, NONFINITE)
# Not attempts: "not yet" (two steps in three, or too soon after the last) and
# "switched off" (every step; said once at start). Counted per reason, neither
# logged nor counted in minerd_upload_attempts_total.
QUIET_REASONS = frozenset({NOT_ON_SCHEDULE, TOO_SOON, DISABLED})


def revision_name(outer_step: int, inner_step: int) -> str:
    return f"rev-{outer_step}-{inner_step}"


@dataclass(frozen=True)
class GateState:
    """What the gate looks at; built by the uploader from the trainer's step."""

    outer_step: int
    inner_step: int
    loss: float
    params_finite: bool = True
    in_progress: bool = False
    last_published: tuple[int, int] | None = None
    forced: bool = False
    seconds_since_last: float | None = None  # since the last revision was published


@dataclass(frozen=True)
class GateDecision:
    allowed: bool
    reason: str
    message: str

    @property
    def quiet(self) -> bool:
        return self.reason in QUIET_REASONS


def _blocked(reason: str, message: str) -> GateDecision:
    return GateDecision(False, reason, message)


def decide(cfg: UploadConfig, state: GateState) -> GateDecision:
    """Allowed only on schedule (or forced), at or past the minimum, with nothing
    in flight, newer than the last published revision, and finite."""
    step = state.inner_step
    if not cfg.enabled:
        return _blocked(DISABLED, "UPLOAD BLOCKED: upload.enabled is false. Nothing will be published.")
    if not state.forced and step % cfg.every_inner_steps != 0:
        return _blocked(
            NOT_ON_SCHEDULE,
            f"UPLOAD SKIPPED: inner_step ({step}) is not a multiple of {cfg.every_inner_steps}.",
        )
    since = state.seconds_since_last
    if not state.forced and since is not None and since < cfg.min_interval_seconds:
        return _blocked(
            TOO_SOON,
            f"UPLOAD SKIPPED: {since:.0f}s since the last upload, under upload.min_interval_seconds "
            f"({cfg.min_interval_seconds:g}s).",
        )
    if step < cfg.min_inner_step:
        return _blocked(
            MIN_INNER_STEP,
            f"UPLOAD BLOCKED: inner_step ({step}) < minimum ({cfg.min_inner_step}). "
            "Validators will reject this! Waiting for more training steps...",
        )
    if state.in_progress:
        return _blocked(
            IN_PROGRESS,
            f"UPLOAD BLOCKED: inner_step ({step}): the previous upload is still in progress. "
            "Skipping this step; uploads are slower than upload.every_inner_steps...",
        )
    current = (state.outer_step, state.inner_step)
    if state.last_published is not None and current <= state.last_published:
        last = revision_name(*state.last_published)
        return _blocked(
            NOT_NEWER,
            f"UPLOAD BLOCKED: outer_step ({state.outer_step}), inner_step ({step}) is not newer than "
            f"the last published revision {last}. Validators will reject this! "
            "Waiting for more training steps...",
        )
    if not math.isfinite(state.loss):
        return _blocked(
            NONFINITE,
            f"UPLOAD BLOCKED: loss ({state.loss}) at inner_step ({step}) is not finite. "
            "Validators will reject this! Waiting for a finite step...",
        )
    if not state.params_finite:
        return _blocked(
            NONFINITE,
            f"UPLOAD BLOCKED: the model has non-finite parameters at inner_step ({step}). "
            "Validators will reject this! Waiting for a finite step...",
        )
    return GateDecision(True, OK, f"UPLOAD ALLOWED: inner_step ({step}).")
