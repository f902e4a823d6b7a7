"""DiLoCo's outer step across replica groups that come and go (torchft).

Each replica group (one ``minerd run``, or one ``torchrun`` job; ``ft.replica_group``)
trains its inner steps alone. Under torchrun every rank has its own torchft manager; the
group's rank 0 runs the manager server and the store the others find it through. Inside
the group the ranks keep DDP (identical weights at every step) or DiLoCo (the
pseudo-gradient averaged over the group first, over torch.distributed); then each rank's
outer sync averages with the same rank of every other group in the quorum, and the group
commits only when all of its ranks do.

At each outer step a group asks torchft's manager for a quorum: the lighthouse
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
the trainer's ``StateExchange``), so it continues from the group's current weights,
not from its own older checkpoint. A peer whose ``Config.training_digest`` differs is
refused: averaging updates of different models or data would silently corrupt both. Which
group leaves is decided by counting the digests of the quorum (``vote.py``): the
minority, whether it is the one recovering or the one others would recover from.

torchft sends that state over HTTP between replicas and unpickles it: replica groups
must trust each other and talk over a private network (docs/OPERATIONS.md).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import structlog
import torch
import torch.distributed as dist

from daemon.config import Config, ConfigError
from daemon.distributed import copy_flat_into
from daemon.engine.outer import OuterOptimizer, Reduce, identity_reduce, norm, update_problem
from daemon.engine.protocols import StateExchange, StopSignal
from daemon.state import MinerState
from daemon.sync.torchft.config import FtConfig
from daemon.sync.torchft.stats import FtStats
from daemon.sync.torchft.vote import QuorumWatch, Verdict, replica_id, verdict

log = structlog.get_logger(__name__)

# A replica joining a quorum split evenly between its config and another waits this long for
# more groups before it leaves (exit 2): the newcomer yields to an established group.
TIE_PATIENCE_SECONDS = 15.0


class ConfigMismatch(Exception):
    """A peer's training config is not ours."""


class PoisonedUpdate(Exception):
    """The quorum's averaged update is not one to apply (not finite, or far too long)."""


class FtOuterOptimizer(OuterOptimizer):
    """The outer step (``OuterStep``), the group to join first (``GroupJoin``) and a component
    (its ``stop`` releases the torchft manager)."""

    name = "ft"

    def __init__(self, params: Sequence[torch.Tensor], cfg: Config, state: MinerState, stats: FtStats,
                 reduce: Reduce = identity_reduce) -> None:
        # ``reduce`` averages over the group's own ranks under torchrun (the identity alone).
        super().__init__(params, cfg.train.outer_lr, cfg.train.outer_momentum, reduce)
        self.ft = FtConfig.of(cfg)
        self.state = state
        self.stats = stats
        self.digest = cfg.training_digest()
        self._exchange: StateExchange | None = None  # the trainer's state, bound by join()
        self._manager: Any = None
        self._store: Any = None
        self._tie_since: float | None = None  # since when this replica's config has no majority
        self._quorum_ids: list[str] = []  # the latest quorum's replica ids (digests inside)
        self._foreign_source: str | None = None  # a recovery source refused for its config

    # ---- the trainer's state, for peers -------------------------------------
    def _state_for_peer(self) -> dict[str, Any]:
        assert self._exchange is not None
        return {"digest": self.digest, **self._exchange.save()}

    def _saw_quorum(self, replica_ids: list[str]) -> None:
        self._quorum_ids = replica_ids

    def _state_from_peer(self, state: dict[str, Any]) -> None:
        theirs = state.get("digest")
        if theirs != self.digest:
            self._foreign_source = str(theirs)  # who leaves is decided in _sync, from the quorum's digests
            raise ConfigMismatch(f"the recovery source runs training config {theirs}, this replica {self.digest}")
        assert self._exchange is not None
        t0 = time.perf_counter()
        self._exchange.load({k: v for k, v in state.items() if k != "digest"})
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

    def _connect(self, stop: StopSignal) -> bool:
        """A manager connected to the lighthouse; waits (not ready, not exiting) while it is
        unreachable, since a supervisor restart would only find it unreachable again."""
        from torch.distributed import TCPStore
        from torchft import Manager, ProcessGroupGloo
        from torchft.manager import MANAGER_ADDR_KEY

        ft = self.ft
        host = ft.host or socket.gethostname()
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if self._store is None:
            # The group's store: rank 0 serves it, the other ranks learn its port from rank 0.
            self._store = TCPStore(host, 0, is_master=True, wait_for_workers=False) if rank == 0 else None
            port = [self._store.port if self._store is not None else 0]
            if world > 1:
                dist.broadcast_object_list(port, src=0)
                if rank != 0:
                    self._store = TCPStore(host, int(port[0]), is_master=False, wait_for_workers=False)
        said = False
        while not stop.requested:
            if rank != 0 and not self._store.check([MANAGER_ADDR_KEY]):
                # Rank 0's manager is not up yet (its lighthouse may be down): wait here, beating,
                # rather than inside torchft's constructor, which blocks without a heartbeat.
                self.state.not_ready_reason = f"waiting for rank 0 to reach the lighthouse at {ft.lighthouse}"
                self.state.beat()
                time.sleep(0.5)
                continue
            try:
                self._manager = Manager(
                    pg=ProcessGroupGloo(timeout=timedelta(seconds=ft.timeout_seconds)),
                    load_state_dict=self._state_from_peer,
                    state_dict=self._state_for_peer,
                    min_replica_size=ft.min_replicas,
                    use_async_quorum=False,
                    # torchft numbers replicas by the digits ending the id.
                    replica_id=replica_id(self.digest, ft.replica_group),
                    lighthouse_addr=ft.lighthouse,
                    store_addr=host,
                    store_port=self._store.port,
                    rank=rank,
                    world_size=world,
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
            self._manager._client = QuorumWatch(self._manager._client, self._saw_quorum)
            self.state.not_ready_reason = None
            log.info("FT CONNECTED: lighthouse reached", lighthouse=ft.lighthouse, replica_group=ft.replica_group,
                     digest=self.digest, host=host)
            return True
        return False

    # ---- the outer step -----------------------------------------------------
    def join(self, stop: StopSignal, state: StateExchange) -> dict[str, Any] | None:
        """Connect, then take part in the group's next outer step (recovering first if behind)."""
        self._exchange = state
        if self._manager is None and not self._connect(stop):
            return None
        self.stats.set_phase("joining")
        return self._sync(stop, joining=True)

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
                if self._foreign_source is not None:
                    theirs, self._foreign_source = self._foreign_source, None
                    standing, counts = verdict(self.digest, self._quorum_ids)
                    # The quorum's ids not showing the source's config is no reason to trust it.
                    self._leave_if_odd({**counts, theirs: max(counts.get(theirs, 0), 1)},
                                       "minority" if standing == "same" else standing, joining)
                    report = self._failed(f"not recovering from a replica group with another training config "
                                          f"({theirs}; this replica {self.digest})", time.perf_counter() - t0)
                    time.sleep(1.0)  # until it has left: a quorum asked for at once would hold it again
                    if joining and not stop.requested:
                        continue
                    return report
                report = self._failed(str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
                                      time.perf_counter() - t0)
                if joining and not stop.requested:
                    self.state.beat()
                    continue  # no quorum yet: keep waiting to join rather than train alone
                return report
            standing, counts = verdict(self.digest, self._quorum_ids)
            self._leave_if_odd(counts, standing, joining)
            if standing != "same":
                # Never averaged with another config: the minority has left (above), a tie stays refused.
                report = self._failed(f"replica groups with another training config in the quorum "
                                      f"(digests: {counts}); their updates are refused", time.perf_counter() - t0)
                time.sleep(1.0)
                if (attempts >= self.ft.sync_attempts and not joining) or (joining and stop.requested):
                    return report
                continue
            grads = self.pseudo_gradient()  # after the quorum: a recovery there replaced the weights
            self.reduce(grads)  # the group's own ranks first (torchrun); the identity alone
            flat = torch.cat([g.reshape(-1) for g in grads])
            local_norm = norm([flat])
            mgr.allreduce(flat).wait()  # the average over the quorum; a failure is reported by should_commit
            # A peer's NaN or outsized update is voted down before anyone commits it: an error
            # reported here makes this replica's should_commit vote no, and the step is applied
            # nowhere (every member sees the same average, so every honest one votes no).
            poisoned = update_problem([flat], local_norm, self.ft.max_update_norm)
            if poisoned is not None:
                mgr.report_error(PoisonedUpdate(poisoned))
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

    def _leave_if_odd(self, counts: dict[str, int], standing: Verdict, joining: bool) -> None:
        """Raise ConfigError (exit 2, one line) when this replica is the one to leave: its config is
        in the quorum's minority or, while joining, tied with another one for longer than
        ``TIE_PATIENCE_SECONDS`` (the groups that would make a majority may still be starting)."""
        if standing in ("same", "majority"):
            self._tie_since = None
            return
        if standing == "tie":
            now = time.monotonic()
            self._tie_since = self._tie_since or now
            if not joining or now - self._tie_since < TIE_PATIENCE_SECONDS:
                return
        theirs = max((d for d in counts if d != self.digest), key=lambda d: counts[d])
        raise ConfigError([f"config error: ft: refused to join the group: {counts[theirs]} of its "
                           f"{sum(counts.values())} replica groups run training config digest {theirs}, this "
                           f"replica {self.digest} (train, the task's sections and compression must match on every "
                           "replica group)"])

    def _failed(self, error: str, seconds: float) -> dict[str, Any]:
        self.stats.failed(error)
        log.warning("FT: outer sync attempt failed; a new quorum is formed of the replicas that answer",
                    error=error, seconds=round(seconds, 3))
        return {"committed": False, "error": error, "sync_seconds": round(seconds, 4)}
