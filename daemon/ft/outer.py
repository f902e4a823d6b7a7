"""DiLoCo's outer step across replica groups that come and go (torchft).

Each replica group (one ``minerd run``; ``ft.replica_group``) trains its inner steps
alone. At each outer step it asks torchft's manager for a quorum: the lighthouse
(``ft.lighthouse``) forms it of the groups whose heartbeats are alive, so a dead group
is left out after its heartbeat times out, and the others finish the step without it.
Then the pseudo-gradients are averaged over the quorum, and only when every member
agrees the step succeeded (``should_commit``) is it applied. A step that fails (a peer
died inside the all-reduce) is tried again with a new quorum, ``ft.sync_attempts``
times; if none succeeds, the round's progress is kept (the anchor is not moved, so the
next outer step sends both rounds) and training goes on.

A group that starts, or restarts after a crash, first joins the group's next outer
step (``join``): torchft sees its step behind the others' and has a live peer send it
the whole training state (weights, inner and outer optimizer, counters, random state:
the trainer's ``training_state``), so it continues from the group's current weights,
not from its own older checkpoint. A peer whose ``Config.training_digest`` differs is
refused: averaging updates of different models or data would silently corrupt both.

torchft sends that state over HTTP between replicas and unpickles it: replica groups
must trust each other and talk over a private network (docs/OPERATIONS.md).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import structlog
import torch

from daemon.config import Config, ConfigError
from daemon.distributed import copy_flat_into
from daemon.ft.stats import FtStats
from daemon.state import MinerState
from daemon.training.outer import OuterOptimizer

log = structlog.get_logger(__name__)


class ConfigMismatch(Exception):
    """A peer's training config is not ours."""


class FtOuterOptimizer(OuterOptimizer):
    name = "ft"

    def __init__(self, params: Sequence[torch.Tensor], cfg: Config, state: MinerState, stats: FtStats) -> None:
        super().__init__(params, cfg.train.outer_lr, cfg.train.outer_momentum)
        self.cfg = cfg
        self.ft = cfg.ft
        self.state = state
        self.stats = stats
        self.digest = cfg.training_digest()
        self._save: Callable[[], dict[str, Any]] | None = None
        self._load: Callable[[dict[str, Any]], None] | None = None
        self._manager: Any = None
        self._store: Any = None
        self._mismatch: str | None = None

    # ---- the trainer's state, for peers -------------------------------------
    def bind_state(self, save: Callable[[], dict[str, Any]], load: Callable[[dict[str, Any]], None]) -> None:
        self._save, self._load = save, load

    def _state_for_peer(self) -> dict[str, Any]:
        assert self._save is not None
        return {"digest": self.digest, **self._save()}

    def _state_from_peer(self, state: dict[str, Any]) -> None:
        theirs = state.get("digest")
        if theirs != self.digest:
            self._mismatch = str(theirs)
            raise ConfigMismatch(f"the group's training config digest is {theirs}, this replica's {self.digest}")
        assert self._load is not None
        t0 = time.perf_counter()
        self._load({k: v for k, v in state.items() if k != "digest"})
        self.stats.recovered(time.perf_counter() - t0)
        log.info("FT RECOVERED: took the current weights and training state from a live peer",
                 outer_step=state["training"]["counters"]["outer_step"],
                 global_step=state["training"]["counters"]["global_step"])

    # ---- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        return None

    def stop(self, timeout: float = 30.0) -> bool:
        if self._manager is not None:
            try:
                self._manager.shutdown(wait=False)
            except Exception as exc:  # already broken: nothing left to release
                log.warning("ft manager shutdown failed", error=str(exc))
            self._manager = None
        return True

    def _connect(self, stop: Any) -> bool:
        """A manager connected to the lighthouse; waits (not ready, not exiting) while it is
        unreachable, since a supervisor restart would only find it unreachable again."""
        from torch.distributed import TCPStore
        from torchft import Manager, ProcessGroupGloo

        ft = self.ft
        host = ft.host or socket.gethostname()
        said = False
        while not stop.requested:
            try:
                self._store = self._store or TCPStore(host, 0, is_master=True, wait_for_workers=False)
                self._manager = Manager(
                    pg=ProcessGroupGloo(timeout=timedelta(seconds=ft.timeout_seconds)),
                    load_state_dict=self._state_from_peer,
                    state_dict=self._state_for_peer,
                    min_replica_size=ft.min_replicas,
                    use_async_quorum=False,
                    # torchft numbers replicas by the digits ending the id.
                    replica_id=f"minerd_{self.digest}_{ft.replica_group}",
                    lighthouse_addr=ft.lighthouse,
                    store_addr=host,
                    store_port=self._store.port,
                    rank=0,
                    world_size=1,
                    hostname=host,
                    timeout=timedelta(seconds=ft.timeout_seconds),
                    quorum_timeout=timedelta(seconds=ft.quorum_timeout_seconds),
                    connect_timeout=timedelta(seconds=ft.connect_timeout_seconds),
                    quorum_retries=2,
                )
            except Exception as exc:  # torchft raises RuntimeError for "cannot connect" and more
                self.stats.set_phase("waiting_for_lighthouse", str(exc).splitlines()[0][:300])
                self.state.not_ready_reason = f"waiting for the lighthouse at {ft.lighthouse}"
                if not said:
                    log.error(f"FT WAITING: the lighthouse at {ft.lighthouse} does not answer; retrying every "
                              f"{ft.connect_timeout_seconds:.0f}s (/readyz answers 503 meanwhile)",
                              error=str(exc).splitlines()[0][:300])
                    said = True
                self.state.beat()  # waiting is not a stall
                time.sleep(1.0)  # a failure that is quick (a bad name) must not spin
                continue
            self.state.not_ready_reason = None
            log.info("FT CONNECTED: lighthouse reached", lighthouse=ft.lighthouse, replica_group=ft.replica_group,
                     digest=self.digest, host=host)
            return True
        return False

    # ---- the outer step -----------------------------------------------------
    def join(self, stop: Any) -> bool:
        """Connect, then take part in the group's next outer step (recovering first if behind)."""
        if self._manager is None and not self._connect(stop):
            return False
        self.stats.set_phase("joining")
        report = self._sync(stop, joining=True)
        self.last_report = report
        return True

    def step(self) -> dict[str, Any]:
        return self._sync(None, joining=False)

    def _sync(self, stop: Any, joining: bool) -> dict[str, Any]:
        mgr = self._manager
        report: dict[str, Any] = {"committed": False}
        attempts = 0
        while True:
            attempts += 1
            t0 = time.perf_counter()
            try:
                mgr.start_quorum()  # blocks; a peer behind recovers here (_state_from_peer)
            except Exception as exc:
                # torchft keeps the failed quorum's future and re-raises it from every later
                # start_quorum: forget it, so the next outer step asks the lighthouse anew (with this
                # replica's step, so that it stays the one others recover from).
                mgr._quorum_future = None
                if self._mismatch is not None:
                    raise ConfigError([f"config error: ft: refused to join the group: its training config digest "
                                       f"is {self._mismatch}, this replica's {self.digest} (train, lm, data and "
                                       "compression must match on every replica group)"]) from None
                report = self._failed(str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
                                      time.perf_counter() - t0)
                if joining and not stop.requested:
                    self.state.beat()
                    continue  # no quorum yet: keep waiting to join rather than train alone
                return report
            grads = self.pseudo_gradient()
            flat = torch.cat([g.reshape(-1) for g in grads])
            mgr.allreduce(flat).wait()  # the average over the quorum; a failure is reported by should_commit
            if mgr.should_commit():
                copy_flat_into(flat, grads)
                seconds = time.perf_counter() - t0
                participants = mgr.num_participants()
                self.stats.committed(participants, seconds)
                return {**self.apply(grads), "committed": True, "participants": participants,
                        "sync_seconds": round(seconds, 4), "sync_bytes": flat.numel() * flat.element_size(),
                        "attempts": attempts, "ft_step": mgr.current_step()}
            error = str(mgr.errored() or "a peer did not commit")
            report = self._failed(error.splitlines()[0][:300], time.perf_counter() - t0)
            if (attempts >= self.ft.sync_attempts and not joining) or (joining and stop.requested):
                return report

    def _failed(self, error: str, seconds: float) -> dict[str, Any]:
        self.stats.failed(error)
        log.warning("FT: outer sync attempt failed; a new quorum is formed of the replicas that answer",
                    error=error, seconds=round(seconds, 3))
        return {"committed": False, "error": error, "sync_seconds": round(seconds, 4)}
