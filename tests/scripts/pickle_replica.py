"""`minerd` serving its recovery state the way torchft does by itself (a pickle, through
torchft's HTTPTransport), with a payload that writes the file $PICKLE_REPLICA_MARKER when
unpickled: a hostile replica group with the honest group's config and token, for
tests/test_ft.py. Usage: PICKLE_REPLICA_MARKER=PATH python -m tests.scripts.pickle_replica run ..."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from torchft.checkpointing import HTTPTransport

import daemon.sync.torchft.connect as connect
from daemon.cli import main
from daemon.sync.torchft.outer import FtOuterOptimizer

MARKER = os.environ["PICKLE_REPLICA_MARKER"]


class Payload:
    """Unpickling this writes MARKER: the proof that a peer's pickle ran."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path(MARKER).write_text, ("a peer's pickle ran code",))


class PickleTransport(HTTPTransport[Any]):
    @property
    def port(self) -> int:
        return int(self._server.socket.getsockname()[1])


def pickle_transport(*args: Any, **kwargs: Any) -> PickleTransport:
    return PickleTransport(timeout=timedelta(seconds=10), num_chunks=0)


real_state = FtOuterOptimizer._state_for_peer


def with_payload(self: FtOuterOptimizer) -> dict[str, Any]:
    return {**real_state(self), "payload": Payload()}


connect.SignedTransport = pickle_transport  # type: ignore[assignment, misc]
FtOuterOptimizer._state_for_peer = with_payload  # type: ignore[method-assign]

if __name__ == "__main__":
    main(sys.argv[1:])
