"""The torchft outer sync's config section (``ft``)."""

from __future__ import annotations

from pydantic import Field, field_validator

from daemon.config import DAY, Section
from daemon.sync.torchft.net import parse_ports
from daemon.urls import http_url_problem, is_host


class FtConfig(Section):
    """Fault-tolerant outer sync across replica groups (torchft): each machine is a replica
    group; its outer steps go through a quorum the lighthouse forms of the groups alive."""

    key = "ft"
    # A group that would commit alone where the others wait for two disagrees on what a step is.
    agreed = frozenset({"min_replicas"})

    enabled: bool = False
    lighthouse: str = Field("", description="the lighthouse's address, http://host:port (torchft_lighthouse --bind)")
    replica_group: int = Field(0, ge=0, le=1_000_000, description="this group's number, unique in the job")
    host: str = Field("", description="the address this replica listens on and peers reach it at; empty = every "
                      "interface, reached at the host name")
    min_replicas: int = Field(1, ge=1, le=10_000, description="fewest replica groups an outer step may commit with")
    timeout_seconds: float = Field(60, gt=0, le=DAY, description="an outer sync's collectives")
    quorum_timeout_seconds: float = Field(
        300, gt=0, le=DAY, description="waiting for a quorum; then the round's progress is kept and tried again"
    )
    connect_timeout_seconds: float = Field(10, gt=0, le=3600, description="one try to reach the lighthouse")
    sync_attempts: int = Field(3, ge=1, le=100, description="tries of one outer step before it is left for the next")
    token_file: str = Field(
        "", description="the group's shared secret (16 to 4096 bytes, the same file on every replica group): "
        "peers prove it before they are handed this replica's state"
    )
    ports: str = Field(
        "", description="ports the state server, the store and the manager server listen on, e.g. 29600-29699 "
        "(on ft.host); empty = any free port"
    )
    max_update_norm: float = Field(
        10, ge=0, le=1e6, description="an averaged update longer than this many times this replica's own is voted "
        "down (0 = off; non-finite ones always are)"
    )

    @field_validator("lighthouse")
    @classmethod
    def _lighthouse_url(cls, value: str) -> str:
        if value and http_url_problem(value):
            raise ValueError(f"must be http://host:port ({http_url_problem(value)})")
        return value

    @field_validator("ports")
    @classmethod
    def _port_range(cls, value: str) -> str:
        parse_ports(value)  # ValueError with its own message
        if value and len(parse_ports(value) or ()) < 3:
            raise ValueError("must hold at least 3 ports (the state server, the store, the manager server)")
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if value and not is_host(value):
            raise ValueError("must be an IP address or a host name")
        return value
