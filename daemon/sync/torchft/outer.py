"""DiLoCo's outer step across replica groups that come and go (torchft).

Each replica group (one ``minerd run``, or one ``torchrun`` job; ``ft.replica_group``)
trains its inner steps alone. Under torchrun every rank has its own torchft manager; the
group's rank 0 runs the manager server and the store the others find it through
(``connect.py``). Inside the group the ranks keep DDP (identical weights at every step)
or DiLoCo (the pseudo-gradient averaged over the group first, over torch.distributed);
then each rank's outer sync averages with the same rank of every other group in the
quorum, and the group commits only when all of its ranks do.

At each outer step a group asks torchft's manager for a quorum: the lighthouse
(``ft.lighthouse``) forms it of the groups whose heartbeats are alive, so a dead group
is left out after its heartbeat times out, and the others finish the step without it.
Then the pseudo-gradients are averaged over the quorum, and only when the group agrees
the step succeeded (``should_commit``) is it applied. An average that is not finite, or
far longer than the group's own update (``ft.max_update_norm``), is voted down first:
one peer's NaN is never committed nor checkpointed. A step that fails is tried again
with a new quorum, ``ft.sync_attempts`` times; if none succeeds, the round's progress is
kept (the anchor is not moved, so the next outer step sends both rounds) and training
goes on.

A group that starts, or restarts after a crash, first joins the group's next outer step
(``join``): torchft sees its step behind the others' and has a live peer send it the
whole training state (weights, inner and outer optimizer, counters, random state: the
trainer's ``StateExchange``), so it continues from the group's current weights, not from
its own older checkpoint. That state travels signed with the group's token and in
minerd's own non-executable format (``transport.py``).

A peer whose ``Config.training_digest`` differs is refused: averaging updates of
different models or data would silently corrupt both. A digest is what a peer says of
itself, so a quorum holding a foreign one is one this replica takes no update and no
state from; it says so once and trains on alone until the quorum is clean, and it never
leaves because others outnumber it (a forged majority would otherwise remove anyone).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import structlog
import torch

from daemon.config import Config
from daemon.distributed import copy_flat_into
from daemon.engine.outer import OuterOptimizer, Reduce, identity_reduce, norm, update_problem
from daemon.engine.protocols import StateExchange, StopSignal
from daemon.rowtable import RowTable
from daemon.state import MinerState
from daemon.sync.torchft.config import FtConfig
from daemon.sync.torchft.connect import Connection, Peers
from daemon.sync.torchft.stats import FtStats
from daemon.sync.torchft.vote import foreign

log = structlog.get_logger(__name__)

# What a peer's state may exceed this replica's own by: Adam's two moments and the outer
# state exist only after the first step, so a newcomer's own state is smaller than a peer's.
STATE_MARGIN = 4
STATE_SLACK_BYTES = 64 << 20

class ConfigMismatch(Exception):
    """A peer's training config is not ours."""


class ForeignPeers(Exception):
    """Replica groups of another training config are in the quorum."""


class PoisonedUpdate(Exception):
    """The quorum's averaged update is not one to apply (not finite, or far too long)."""


class FtOuterOptimizer(OuterOptimizer):
    """The outer step (``OuterStep``), the group to join first (``GroupJoin``) and a component
    (its ``stop`` releases the torchft manager)."""

    name = "ft"

    def __init__(self, params: Sequence[torch.Tensor], cfg: Config, state: MinerState, stats: FtStats,
                 reduce: Reduce = identity_reduce) -> None:
        # ``reduce`` averages over the group's own ranks under torchrun (the identity alone).
        super().__init__(params, cfg.train.outer_lr, cfg.train.outer_momentum, reduce, offload=cfg.train.outer_offload)
        self.ft = FtConfig.of(cfg)
        self.state = state
        self.stats = stats
        self.digest = cfg.training_digest()
        self.connection = Connection(self.ft, self.digest, state, stats)
        self._exchange: StateExchange | None = None  # the trainer's state, bound by join()
        self._quorum_ids: list[str] = []  # the latest quorum's replica ids (digests inside)
        self._offered: set[str] = set()  # digests of recovery sources refused since the last quorum
        self._refusing: frozenset[str] = frozenset()  # the foreign digests last said, to say them once

    # ---- the trainer's state, for peers -------------------------------------
    def _state_for_peer(self) -> dict[str, Any]:
        assert self._exchange is not None
        return {"digest": self.digest, **self._exchange.save()}

    def _state_bound(self) -> int:
        """The most bytes of state this replica takes from a peer: a few times its own."""
        assert self._exchange is not None
        own = sum(t.numel() * t.element_size() for t in _tensors(self._exchange.save()))
        return STATE_MARGIN * own + STATE_SLACK_BYTES

    def _saw_quorum(self, replica_ids: list[str]) -> None:
        self._quorum_ids = replica_ids

    def _foreign_offered(self, digest: str) -> None:
        self._offered.add(digest)

    def _state_from_peer(self, state: dict[str, Any]) -> None:
        theirs = state.get("digest")
        if theirs != self.digest:  # the transport checked it already: a second look costs nothing
            self._offered.add(str(theirs)[:32])
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
        self.connection.close()
        return True

    # ---- the outer step -----------------------------------------------------
    def join(self, stop: StopSignal, state: StateExchange) -> dict[str, Any] | None:
        """Connect, then take part in the group's next outer step (recovering first if behind)."""
        self._exchange = state
        peers = Peers(self._state_for_peer, self._state_from_peer, self._state_bound, self._foreign_offered,
                      self._saw_quorum)
        if self.connection.manager is None and not self.connection.open(stop, peers):
            return None
        self.stats.set_phase("joining")
        return self._sync(stop, joining=True)

    def step(self) -> dict[str, Any]:
        return self._sync(None, joining=False)

    def _sync(self, stop: Any, joining: bool) -> dict[str, Any]:
        mgr = self.connection.manager
        report: dict[str, Any] = {"committed": False}
        attempts = 0
        while True:
            attempts += 1
            t0 = time.perf_counter()
            self._offered.clear()
            try:
                mgr.start_quorum()  # blocks; a peer behind recovers here (_state_from_peer)
            except Exception as exc:
                # torchft keeps the failed quorum's future and re-raises it from every later
                # start_quorum: forget it, so the next outer step asks the lighthouse anew (with this
                # replica's step, so that it stays the one others recover from).
                mgr._quorum_future = None
                report = self._failed(str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
                                      time.perf_counter() - t0)
                if joining and not stop.requested and not self._offered:
                    self.state.beat()
                    continue  # no quorum yet: keep waiting to join rather than train alone
                return report
            others = {**foreign(self.digest, self._quorum_ids), **{d: 1 for d in self._offered}}
            if others:
                # Never averaged with another config (shapes may not even match): no all-reduce,
                # a vote against committing, and training goes on from this replica's own state.
                self._refuse(others)
                mgr.report_error(ForeignPeers(f"replica groups of another training config: {sorted(others)}"))
                _vote(mgr)
                report = self._failed(f"replica groups with another training config in the quorum (digests "
                                      f"{sorted(others)}); their updates and state are refused",
                                      time.perf_counter() - t0)
                time.sleep(1.0)  # a quorum asked for at once would hold the same groups
                if joining or attempts >= self.ft.sync_attempts:
                    return report  # train on alone; the next outer step asks again
                continue
            self._refuse({})
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
            error = poisoned or str(mgr.errored() or "a peer did not commit")
            report = self._failed(error.splitlines()[0][:300], time.perf_counter() - t0)
            # Joining waits for a quorum (above), not for a commit: a quorum whose steps keep failing
            # (a peer that always sends poison) would keep this replica from training at all.
            if attempts >= self.ft.sync_attempts or (joining and stop.requested):
                return report

    def _refuse(self, others: dict[str, int]) -> None:
        """Say once (per set of foreign digests) that the quorum's other configs are refused."""
        digests = frozenset(others)
        if digests == self._refusing:
            return
        self._refusing = digests
        if not digests:
            log.info("FT: the quorum holds this replica's training config only again")
            return
        self.stats.set_phase("refusing_peers", f"foreign training configs {sorted(digests)}")
        log.warning(f"FT REFUSED: replica groups of another training config are in the quorum "
                    f"({', '.join(f'{d} x{n}' for d, n in sorted(others.items()))}; this replica {self.digest}): "
                    "their updates and state are refused, and this replica trains on alone until they leave",
                    digests=sorted(digests))

    def _failed(self, error: str, seconds: float) -> dict[str, Any]:
        self.stats.failed(error)
        log.warning("FT: outer sync attempt failed; a new quorum is formed of the replicas that answer",
                    error=error, seconds=round(seconds, 3))
        return {"committed": False, "error": error, "sync_seconds": round(seconds, 4)}


def _vote(mgr: Any) -> None:
    """Take part in the group's commit vote (this rank votes no): its other ranks wait for it."""
    try:
        mgr.should_commit()
    except Exception as exc:  # the vote itself may time out: the step is not committed either way
        log.warning("FT: the commit vote failed", error=str(exc).splitlines()[0][:300])


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, RowTable):
        yield from tree.tensors.values()
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, list | tuple):
        for v in tree:
            yield from _tensors(v)
