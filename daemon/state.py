"""The miner's live state: written by the training thread, read by the API.

One writer (the training loop) and readers in other threads (the HTTP server,
the watchdog, metric collectors). Plain attribute reads and writes are atomic
under the GIL, which is all the readers need: a snapshot may mix two steps'
numbers for a moment, never a torn value. Control requests from the API go
the other way through ``threading.Event`` flags the loop polls between steps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from daemon import __version__

Phase = str  # "starting" | "training" | "stopping" | "stopped"


@dataclass
class Controls:
    """Requests from the API, taken by the training loop between inner steps."""

    checkpoint: threading.Event = field(default_factory=threading.Event)
    upload: threading.Event = field(default_factory=threading.Event)
    paused: threading.Event = field(default_factory=threading.Event)


@dataclass
class MinerState:
    task: str = "causal_lm"
    device: str = "cpu"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    version: str = __version__
    phase: Phase = "starting"
    outer_step: int = 0
    inner_step: int = 0
    global_step: int = 0
    epoch: int = 0
    loss: float | None = None
    learning_rate: float | None = None
    last_step_seconds: float | None = None
    last_step_time: float | None = None  # wall clock, seconds since the epoch
    samples_per_second: float | None = None
    tokens_per_second: float | None = None  # tasks that count tokens (the language model)
    tokens_total: int | None = None
    mfu: float | None = None  # model FLOPs utilisation, when the device's peak is known
    # The last evaluation, as the task reports it (loss and bits per byte, or recall
    # and the separation margin), and when it ran.
    eval: dict[str, float] = field(default_factory=dict)
    eval_epoch: int | None = None
    eval_global_step: int | None = None
    model_on_accelerator: bool = False
    first_step_done: bool = False
    started_monotonic: float = field(default_factory=time.monotonic)
    last_progress_monotonic: float = field(default_factory=time.monotonic)
    last_progress_wall: float = field(default_factory=time.time)
    last_checkpoint_time: float | None = None
    checkpoint_bytes: int | None = None  # room one checkpoint may take (the largest kept)
    not_ready_reason: str | None = None  # e.g. waiting for disk space; /readyz says it
    # Training goes on but is not healthy (restored after non-finite steps, no finite step since):
    # /livez answers 503 with it, whatever the heartbeat says.
    live_problem: str | None = None
    requests_shed: int = 0  # API requests answered 429 for being over the request budget
    diagnostics: dict[str, Any] = field(default_factory=dict)
    controls: Controls = field(default_factory=Controls)
    # Sections of /status owned by components (mining, embeddings, upload),
    # read at request time.
    sections: dict[str, Callable[[], dict[str, Any]]] = field(default_factory=dict)
    _beat_listeners: list[Callable[[], None]] = field(default_factory=list)

    def beat(self) -> None:
        """Training made progress (a micro-step, a checkpoint, an eval chunk)."""
        self.last_progress_monotonic = time.monotonic()
        self.last_progress_wall = time.time()
        for listener in self._beat_listeners:
            listener()

    def count_shed_request(self) -> None:
        self.requests_shed += 1  # the API's event loop is the only writer

    def on_beat(self, listener: Callable[[], None]) -> None:
        self._beat_listeners.append(listener)

    def progress_age(self) -> float:
        return time.monotonic() - self.last_progress_monotonic

    def uptime(self) -> float:
        return time.monotonic() - self.started_monotonic

    @property
    def ready(self) -> bool:
        return self.first_step_done and self.phase == "training" and self.not_ready_reason is None

    def section(self, name: str) -> dict[str, Any] | None:
        provider = self.sections.get(name)
        return provider() if provider is not None else None
