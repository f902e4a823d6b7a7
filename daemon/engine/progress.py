"""Where training stands: the counters a checkpoint keeps, and the snapshots the trainer
hands out of them (tests, benchmarks and the runner read these, never the counters)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Counters:
    outer_step: int = 0
    inner_step: int = 0
    global_step: int = 0
    epoch: int = 1  # 1-based, as operators count epochs
    batch_pos: int = 0  # next micro-batch of the epoch
    samples: int = 0
    nonfinite_in_row: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Progress:
    """Where training stands: a snapshot of the counters, for the runner, tests and benchmarks."""

    outer_step: int
    inner_step: int
    global_step: int
    epoch: int
    batch_pos: int
    samples: int
    nonfinite_in_row: int


@dataclass(frozen=True)
class Summary:
    """What a finished (or stopped) training reports: where it stands and what it sent."""

    progress: Progress
    comm_bytes: int
    last_loss: float | None
    last_eval: dict[str, float]
