"""The aggregator of the bucket exchange (``minerd aggregate``): scores each round's
submissions as a validator does, applies the accepted ones and publishes the next global
revision.

Round R is open from the moment ``global/round-<R>`` is published. It closes
``exchange.round_seconds`` later, or as soon as ``exchange.expected_miners`` submitted. Each
submission is read as hostile and checked (``score.py``); one byte-identical to an earlier
one (by the storage's own clock) is a copy, whatever miner id it carries; each remaining one
is applied alone to the global weights and accepted when it lowers the held-out loss by more
than ``exchange.min_improvement``. The accepted ones are averaged and applied with the outer
Nesterov step (``train.outer_lr``, ``train.outer_momentum``); ``global/round-<R+1>`` is
published (weights, the outer momentum, ``round.json``; its manifest last), then
``rounds/<R>/scores.json``, then ``global/LATEST``. Restarted, the aggregator reads the
open round back from the target and goes on: ``LATEST`` moves once per round.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn

from daemon.engine.protocols import StopSignal
from daemon.storage import Storage, StorageError
from daemon.sync.exchange.config import ExchangeConfig
from daemon.sync.exchange.layout import (
    FORMAT,
    MANIFEST,
    MAX_SUBMISSIONS,
    OUTER_FILE,
    POINTER,
    ROUND_FILE,
    Refused,
    RoundInfo,
    dumps,
    global_folder,
    publish,
    read_pointer,
    scores_key,
    submission_folder,
)
from daemon.sync.exchange.score import Submission, Verdict, loss_with, read_submission
from daemon.sync.exchange.weights import load_global, named_params, write_model, write_momentum
from daemon.upload.layout import RevisionLayout

log = structlog.get_logger("minerd.exchange")


class Aggregator:
    def __init__(self, ex: ExchangeConfig, storage: Storage, model: nn.Module, layout: RevisionLayout,
                 evaluate: Callable[[nn.Module], float], applicability: str, inner_steps: int, outer_lr: float,
                 outer_momentum: float, clock: Callable[[], float] = time.time,
                 replay: Callable[[nn.Module, Any], float | None] | None = None) -> None:
        self.ex, self.storage, self.model, self.layout, self.evaluate = ex, storage, model, layout, evaluate
        self.applicability, self.inner_steps = applicability, inner_steps
        self.lr, self.momentum, self.clock = outer_lr, outer_momentum, clock
        self.replay = replay  # a model's loss on the samples a miner's data record names
        self.buffers = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        self.round = -1
        self.opened_at = 0.0
        self.last_scores: dict[str, Any] = {}
        self.held_out_loss: float | None = None  # of the last published global revision
        self.last_round_seconds = 0.0
        self.verdicts: dict[str, int] = {}  # submissions scored since start, by reason

    # ---- opening ----------------------------------------------------------------------
    def open(self) -> None:
        """Read the open round back from the target, or publish round 0 from the model as built."""
        latest = read_pointer(self.storage)
        if latest is None:
            loss = self.evaluate(self.model)
            self._publish(0, RoundInfo(0, self.applicability, self.inner_steps, self.clock(), loss, 0, 0))
            log.info(f"GLOBAL ROUND 0 PUBLISHED: held-out loss {loss:.4f}", round=0)
            return
        info, momentum = load_global(self.storage, latest, self.model, self.applicability)
        for name, value in momentum.items():
            self.buffers[name].copy_(value)
        self.round, self.opened_at, self.held_out_loss = latest, info.opened_at, info.held_out_loss
        log.info(f"EXCHANGE: round {latest} is open (since {time.time() - info.opened_at:.0f} s)", round=latest)

    # ---- a round ----------------------------------------------------------------------
    def submitted(self) -> list[str]:
        """Miners whose submission to the open round is complete (its manifest written)."""
        names = self.storage.list_folders(f"rounds/{self.round}", MAX_SUBMISSIONS)
        return [n for n in names if self.storage.modified(f"{submission_folder(self.round, n)}/{MANIFEST}")]

    def due(self) -> bool:
        if self.clock() - self.opened_at >= self.ex.round_seconds:
            return True
        return bool(self.ex.expected_miners) and len(self.submitted()) >= self.ex.expected_miners

    def run(self, stop: StopSignal, beat: Callable[[], None] = lambda: None) -> None:
        """Rounds until a stop: wait for each to close, score, publish the next."""
        while not stop.requested:
            if self.due():
                self.close()
            else:
                beat()
                time.sleep(min(self.ex.poll_seconds, 1.0))

    def close(self) -> list[Verdict]:
        """Score the open round's submissions, apply the accepted ones, publish the next round."""
        r = self.round
        before = self.evaluate(self.model)
        verdicts: list[Verdict] = []
        valid: list[Submission] = []
        for miner in self.submitted():
            try:
                valid.append(read_submission(self.storage, r, miner, self.model, self.applicability))
            except Refused as exc:
                reason, _, detail = str(exc).partition(": ")
                verdicts.append(Verdict(miner, False, reason, detail))
            except StorageError as exc:
                verdicts.append(Verdict(miner, False, "structure", f"unreadable: {exc}"))
        for sub in self._copies(valid):
            verdicts.append(Verdict(sub.miner, False, "copy", "byte-identical to an earlier submission",
                                    sha256=sub.sha256, bytes=sub.bytes))
            valid.remove(sub)
        accepted: list[Submission] = []
        for sub in valid:
            after = loss_with(self.model, sub.pseudo_gradient, self.evaluate)
            ok = before - after > self.ex.min_improvement
            own = self._own_losses(sub)
            verdicts.append(Verdict(sub.miner, ok, "accepted" if ok else "no_improvement", "", before, after, *own,
                                    sha256=sub.sha256, bytes=sub.bytes))
            if ok:
                accepted.append(sub)
        for v in verdicts:
            self.verdicts[v.reason] = self.verdicts.get(v.reason, 0) + 1
            if v.accepted:
                v.weight = 1 / len(accepted)
            else:
                losses = f" (loss {v.loss_before:.4f} -> {v.loss_after:.4f})" if v.loss_after is not None else ""
                log.warning(f"SUBMISSION REJECTED: round {r} miner {v.miner}: {v.reason}{losses}"
                            + (f": {v.detail}" if v.detail else ""), round=r, miner=v.miner, reason=v.reason)
        self._apply([s.pseudo_gradient for s in accepted])
        loss = self.evaluate(self.model)
        info = RoundInfo(r + 1, self.applicability, self.inner_steps, self.clock(), loss, len(accepted),
                         len(verdicts))
        scores = {"format": FORMAT, "round": r, "held_out_loss_before": before, "held_out_loss_after": loss,
                  "submissions": {v.miner: v.to_json() for v in sorted(verdicts, key=lambda v: v.miner)}}
        self.last_round_seconds = max(0.0, self.clock() - self.opened_at)
        self._publish(r + 1, info, scores)
        log.info(f"GLOBAL ROUND {r + 1} PUBLISHED: {len(accepted)} of {len(verdicts)} submissions accepted, "
                 f"held-out loss {loss:.4f}", round=r + 1, accepted=len(accepted), submitted=len(verdicts))
        return verdicts

    def _own_losses(self, sub: Submission) -> tuple[float | None, float | None]:
        """The loss on the samples the miner says it trained on, before and after its submission:
        what a validator compares to see that it trained on its own data (reported, not used to
        accept or reject)."""
        replay, data = self.replay, sub.record.get("data")
        if replay is None or data is None:
            return None, None
        before = replay(self.model, data)
        if before is None:
            return None, None

        def own(m: nn.Module) -> float:
            value = replay(m, data)
            return float("nan") if value is None else value

        return before, loss_with(self.model, sub.pseudo_gradient, own)

    def _copies(self, valid: list[Submission]) -> list[Submission]:
        """All but the earliest of each group of byte-identical pseudo-gradients."""
        by_sha: dict[str, list[Submission]] = {}
        for sub in valid:
            by_sha.setdefault(sub.sha256, []).append(sub)
        out = []
        for group in by_sha.values():
            if len(group) > 1:
                def written(s: Submission) -> tuple[float, str]:
                    t = self.storage.modified(f"{submission_folder(self.round, s.miner)}/{MANIFEST}")
                    return (t if t is not None else float("inf"), s.miner)

                out += sorted(group, key=written)[1:]
        return out

    @torch.no_grad()
    def _apply(self, grads: list[dict[str, torch.Tensor]]) -> None:
        if not grads:
            return
        params = named_params(self.model)
        for name, p in params.items():
            g = torch.stack([d[name].to(p.device, p.dtype) for d in grads]).mean(0)
            b = self.buffers[name]
            b.mul_(self.momentum).add_(g)
            p.sub_(g.add(b, alpha=self.momentum), alpha=self.lr)

    def _publish(self, round_: int, info: RoundInfo, scores: dict[str, Any] | None = None) -> None:
        with tempfile.TemporaryDirectory(prefix="minerd-aggregate-") as tmp:
            folder = Path(tmp)
            names = write_model(self.model, self.layout, folder)
            write_momentum(self.buffers, folder / OUTER_FILE)
            (folder / ROUND_FILE).write_bytes(dumps(info.to_json()))
            publish(self.storage, global_folder(round_), folder, [*names, OUTER_FILE, ROUND_FILE])
        if scores is not None:
            self.storage.put_bytes(scores_key(round_ - 1), dumps(scores))
            self.last_scores = scores
        self.storage.put_bytes(POINTER, f"round-{round_}\n".encode())  # last: the round is whole
        self.round, self.opened_at, self.held_out_loss = round_, info.opened_at, info.held_out_loss

    def status(self) -> dict[str, Any]:
        return {"round": self.round, "opened_at": self.opened_at, "held_out_loss": self.held_out_loss,
                "last_round_seconds": round(self.last_round_seconds, 3), "verdicts": dict(self.verdicts),
                "target": self.storage.describe(),
                "last_scores": {m: {k: v for k, v in s.items() if k in ("accepted", "reason", "loss_before",
                                                                        "loss_after")}
                                for m, s in self.last_scores.get("submissions", {}).items()}}
