"""A miner in the bucket exchange: trains a round from the global weights, submits its
compressed pseudo-gradient, follows the global model as soon as the aggregator publishes it.

Plugged into the trainer as its outer step and its group join. The join waits for a global
revision (round 0 at the least) and starts from it. ``step`` is called once a round's inner
steps are done, and then at every inner step until it reports a new round: it submits the
round's pseudo-gradient once, then looks for a newer global revision every
``exchange.poll_seconds`` while training goes on from the miner's own weights (it never
waits); when one is there and verifies, its weights become the model's and the anchor, and
the next round starts. A miner that falls behind drops its stale round unsubmitted and takes
the newest global revision.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn

from daemon.compression import CodecSpec, artifact
from daemon.compression.codec import Encoded, decode, encode
from daemon.engine.protocols import StateExchange, StopSignal
from daemon.state import MinerState
from daemon.storage import Storage, StorageError
from daemon.sync.exchange.config import ExchangeConfig
from daemon.sync.exchange.layout import (
    FORMAT,
    SUBMISSION_FILE,
    Refused,
    RoundInfo,
    dumps,
    publish,
    read_pointer,
    submission_folder,
)
from daemon.sync.exchange.score import loss_with
from daemon.sync.exchange.weights import load_global

log = structlog.get_logger("minerd.exchange")


@dataclass(frozen=True)
class Preview:
    """What the aggregator's scoring says of a submission before it is sent."""

    accepted: bool
    reason: str
    loss_before: float | None
    loss_after: float | None

    @property
    def losses(self) -> str:
        if self.loss_before is None or self.loss_after is None:
            return ""
        return f" (loss {self.loss_before:.4f} -> {self.loss_after:.4f})"



class ExchangeMiner:
    def __init__(self, ex: ExchangeConfig, storage: Storage, model: nn.Module, codec: CodecSpec, applicability: str,
                 inner_steps: int, state: MinerState, data_record: Callable[[int], dict[str, Any]] | None = None,
                 held_out_loss: Callable[[nn.Module], float] | None = None) -> None:
        self.ex, self.storage, self.model, self.codec = ex, storage, model, codec
        self.applicability, self.inner_steps, self.state, self.data_record = (
            applicability, inner_steps, state, data_record)
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.anchor = [p.detach().clone() for p in self.params]
        self.base = -1  # the global round the anchor holds
        self.submitted = False
        self.refused: set[int] = set()  # global rounds that did not verify: never tried again
        self.last_info: RoundInfo | None = None
        self.newest_seen = -1  # the newest global round the pointer named
        self.held_out_loss = held_out_loss
        self.counts = {"submitted": 0, "failed": 0, "dropped": 0, "blocked": 0, "refused_global": 0}
        self.last_preview: Preview | None = None
        self._next_poll = 0.0

    # ---- the trainer's side ------------------------------------------------------------
    def join(self, stop: StopSignal, state: StateExchange) -> dict[str, Any] | None:
        said = False
        while not stop.requested:
            newest = self._newest()
            if newest is not None and newest > self.base:
                if self.base >= 0:
                    log.info(f"EXCHANGE: the global model moved past this checkpoint's round {self.base}: "
                             f"starting from global round {newest}")
                report = self._load(newest)
                if report is not None:
                    return {**report, "joined": f"EXCHANGE JOINED: following global round {newest}"}
            elif newest is not None:
                log.info(f"EXCHANGE: resuming from this miner's checkpoint at round {self.base}")
                return None
            if not said:
                log.info("EXCHANGE: waiting for the aggregator's first global revision",
                         target=self.storage.describe())
                said = True
            self.state.not_ready_reason = "waiting for the exchange's global revision"
            self.state.beat()
            time.sleep(min(self.ex.poll_seconds, 1.0))
        return None

    def step(self) -> dict[str, Any] | None:
        if not self.submitted:
            newest = self._newest(force=True)
            if newest is not None and newest > self.base:  # the round closed without this miner
                log.warning(f"ROUND {self.base} DROPPED: the global model is at round {newest}; catching up")
                self.counts["dropped"] += 1
                return self._load(newest)
            self._submit()
            self.submitted = True
        newest = self._newest()
        if newest is not None and newest > self.base:
            return self._load(newest)
        return None  # no new global revision yet: training goes on from this miner's weights

    # ---- submitting --------------------------------------------------------------------
    @torch.no_grad()
    def _submit(self) -> None:
        pseudo = {n: (a - p.detach()).float().cpu() for n, a, p in zip(self.names, self.anchor, self.params,
                                                                         strict=True)}
        enc = encode(pseudo, self.codec)
        preview = self._preview(enc)
        self.last_preview = preview
        if preview is not None and self.ex.preview == "block" and not preview.accepted:
            self.counts["blocked"] += 1
            log.warning(f"UPLOAD BLOCKED: round {self.base} preview {preview.reason}{preview.losses}; not "
                        "submitted (exchange.preview=block)", round=self.base, reason=preview.reason)
            return
        record = {"format": FORMAT, "miner_id": self.ex.miner_id, "round": self.base,
                  "inner_steps": self.inner_steps, "applicability": self.applicability,
                  "global_step": self.state.global_step}
        if self.data_record is not None:
            record["data"] = self.data_record(self.state.global_step)
        folder = submission_folder(self.base, self.ex.miner_id)
        with tempfile.TemporaryDirectory(prefix="minerd-submit-") as tmp:
            names = artifact.write(enc, Path(tmp), outer_step=self.base, inner_steps=self.inner_steps)
            (Path(tmp) / SUBMISSION_FILE).write_bytes(dumps(record))
            try:
                publish(self.storage, folder, Path(tmp), [*names, SUBMISSION_FILE])
            except StorageError as exc:
                log.warning(f"ROUND {self.base} NOT SUBMITTED: {exc}; training goes on")
                self.counts["failed"] += 1
                return
            size = sum((Path(tmp) / n).stat().st_size for n in names)
        self.counts["submitted"] += 1
        said = ""
        if preview is not None and preview.loss_after is not None:
            said = f", preview loss {preview.loss_before:.4f} -> {preview.loss_after:.4f}"
        log.info(f"ROUND {self.base} SUBMITTED: {size / 1000:.1f} KB{said}", round=self.base, bytes=size,
                 preview=None if preview is None else preview.reason)

    @torch.no_grad()
    def _preview(self, enc: Encoded) -> Preview | None:
        """The aggregator's own verdict on ``enc``, from here: its structure, then the held-out
        loss of the round's global weights (the anchor) without and with it applied alone."""
        if self.held_out_loss is None:
            return None
        found = artifact.problems(enc.header, enc.tensors, {n: list(p.shape) for n, p in zip(
            self.names, self.params, strict=True)})
        if found:
            return Preview(False, "structure", None, None)
        decoded = decode(enc)
        trained = [p.detach().clone() for p in self.params]
        try:
            for p, a in zip(self.params, self.anchor, strict=True):
                p.copy_(a)
            before = self.held_out_loss(self.model)
            after = loss_with(self.model, decoded, self.held_out_loss)
        finally:
            for p, t in zip(self.params, trained, strict=True):
                p.copy_(t)
        ok = before - after > self.ex.min_improvement
        return Preview(ok, "accepted" if ok else "no_improvement", before, after)

    # ---- following the global model ----------------------------------------------------
    def _newest(self, force: bool = False) -> int | None:
        now = time.monotonic()
        if not force and now < self._next_poll:
            return None
        self._next_poll = now + self.ex.poll_seconds
        try:
            newest = read_pointer(self.storage)
        except (Refused, StorageError) as exc:
            log.warning(f"GLOBAL REFUSED: {exc}")
            return None
        if newest is not None:
            self.newest_seen = max(self.newest_seen, newest)
        return None if newest in self.refused else newest

    def _load(self, round_: int) -> dict[str, Any] | None:
        try:
            info, _ = load_global(self.storage, round_, self.model, self.applicability)
        except Refused as exc:
            self.refused.add(round_)
            self.counts["refused_global"] += 1
            log.error(f"GLOBAL REFUSED: {exc}; this miner stays on round {self.base}")
            return None
        with torch.no_grad():
            for a, p in zip(self.anchor, self.params, strict=True):
                a.copy_(p.detach())
        self.base, self.submitted, self.last_info = round_, False, info
        self.state.not_ready_reason = None
        loss = "n/a" if info.held_out_loss is None else f"{info.held_out_loss:.4f}"
        log.info(f"GLOBAL ROUND {round_} LOADED: {info.accepted} of {info.submitted} submissions accepted, "
                 f"held-out loss {loss}", round=round_)
        # The schedule's position: the inner steps the global model has had (a miner that trained
        # more while it waited keeps its own count).
        return {"committed": True, "round": round_, "position": round_ * self.inner_steps}

    # ---- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"anchor": [a.cpu() for a in self.anchor], "base": self.base, "submitted": self.submitted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for dst, src in zip(self.anchor, state["anchor"], strict=True):
            dst.copy_(src)
        self.base, self.submitted = int(state["base"]), bool(state["submitted"])

    def status(self) -> dict[str, Any]:
        return {"miner_id": self.ex.miner_id, "round": self.base, "round_submitted": self.submitted,
                "rounds_behind": self.rounds_behind, "newest_global_round": self.newest_seen,
                "target": self.storage.describe(), "counts": dict(self.counts)}

    @property
    def rounds_behind(self) -> int:
        return max(0, self.newest_seen - self.base) if self.base >= 0 else 0
