"""Connecting a replica group's rank to torchft: its store, its state server, its manager.

Rank 0 of the group serves the group's store and torchft's manager server; every rank
has a manager client and its own state server (each rank hands its own part of the
state to the same rank of a recovering group). Everything listens on ``ft.host`` at
ports of ``ft.ports`` (``net.py``); the state server proves and checks the group's
token (``transport.py``). While the lighthouse does not answer, the rank waits (not
ready, not exiting: a supervisor restart would only find it unreachable again).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog
import torch.distributed as dist

from daemon.engine.protocols import StopSignal
from daemon.state import MinerState
from daemon.sync.torchft.config import FtConfig
from daemon.sync.torchft.net import bound_store, free_port, manager_server_on, parse_ports
from daemon.sync.torchft.stats import FtStats
from daemon.sync.torchft.tokens import read_token
from daemon.sync.torchft.transport import SignedTransport, StateRefused
from daemon.sync.torchft.vote import QuorumWatch, replica_id

log = structlog.get_logger(__name__)

@dataclass
class Peers:
    """What the outer step hands torchft to talk to the trainer and to report back."""

    state_for_peer: Callable[[], Any]
    state_from_peer: Callable[[Any], None]
    state_bound: Callable[[], int]  # bytes of state this replica accepts from a peer
    foreign_offered: Callable[[str], None]  # a peer of another config offered its state
    saw_quorum: Callable[[list[str]], None]


class _QuietRefusals(logging.Filter):
    """torchft logs every failed recovery with its traceback at error level; a refusal by the
    state transport has its own one line (``FT REFUSED``), so its traceback goes to debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, StateRefused):
            record.levelno, record.levelname, record.exc_info, record.exc_text = logging.DEBUG, "DEBUG", None, None
        return True


class Connection:
    def __init__(self, ft: FtConfig, digest: str, state: MinerState, stats: FtStats) -> None:
        self.ft = ft
        self.digest = digest
        self.state = state
        self.stats = stats
        self.bind = ft.host  # "" (no ft.host): every interface, as torchft binds by itself
        self.host = ft.host or socket.gethostname()  # what peers are told to reach
        self.ports = parse_ports(ft.ports)
        self.manager: Any = None
        self._store: Any = None
        self._transport: SignedTransport | None = None

    def open(self, stop: StopSignal, peers: Peers) -> bool:
        """A manager connected to the lighthouse; False when a stop came first."""
        from torchft import Manager, ProcessGroupGloo
        from torchft.manager import MANAGER_ADDR_KEY

        ft, host = self.ft, self.host
        refusals = logging.getLogger("torchft.manager")
        if not any(isinstance(f, _QuietRefusals) for f in refusals.filters):
            refusals.addFilter(_QuietRefusals())
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self._open_store(rank, world)
        if self._transport is None:
            self._transport = SignedTransport(self.bind, host, self.ports, read_token(ft.token_file), self.digest,
                                              timedelta(seconds=ft.timeout_seconds), peers.state_bound,
                                              peers.foreign_offered)
        said = False
        while not stop.requested:
            if rank != 0 and not self._store.check([MANAGER_ADDR_KEY]):
                # Rank 0's manager is not up yet (its lighthouse may be down): wait here, beating,
                # rather than inside torchft's constructor, which blocks without a heartbeat.
                self.state.not_ready_reason = f"waiting for rank 0 to reach the lighthouse at {ft.lighthouse}"
                self.state.beat()
                time.sleep(0.5)
                continue
            server = (manager_server_on(self.bind, free_port(self.bind, self.ports)) if rank == 0
                      else contextlib.nullcontext())
            try:
                with server:
                    self.manager = Manager(
                        pg=ProcessGroupGloo(timeout=timedelta(seconds=ft.timeout_seconds)),
                        load_state_dict=peers.state_from_peer,
                        state_dict=peers.state_for_peer,
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
                        checkpoint_transport=self._transport,
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
            self.manager._client = QuorumWatch(self.manager._client, peers.saw_quorum)
            self.state.not_ready_reason = None
            log.info("FT CONNECTED: lighthouse reached", lighthouse=ft.lighthouse, replica_group=ft.replica_group,
                     digest=self.digest, host=host, state_port=self._transport.port)
            return True
        return False

    def _open_store(self, rank: int, world: int) -> None:
        """The group's store: rank 0 serves it, the other ranks learn its port from rank 0."""
        from torch.distributed import TCPStore

        if self._store is not None:
            return
        self._store = bound_store(self.bind, self.ports, self.host) if rank == 0 else None
        port = [self._store.port if self._store is not None else 0]
        if world > 1:
            dist.broadcast_object_list(port, src=0)
            if rank != 0:
                self._store = TCPStore(self.host, int(port[0]), is_master=False, wait_for_workers=False)

    def close(self) -> None:
        if self.manager is not None:
            try:
                self.manager.shutdown(wait=False)
            except Exception as exc:  # already broken: nothing left to release
                log.warning("ft manager shutdown failed", error=str(exc))
            self.manager = None
        elif self._transport is not None:  # never handed to a manager: its server is ours to stop
            self._transport.shutdown(wait=False)
        self._transport = None
