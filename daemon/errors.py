"""Errors every part may raise and the runner answers the same way."""

from __future__ import annotations


class CorruptState(RuntimeError):
    """A file of the miner's own state on disk is broken (truncated, corrupt, missing).

    Restarting would read it again and fail again, so the runner ends with exit 2 (which the
    pm2 and systemd files shipped here do not restart) and one line: what is broken, then
    ``remedy``, what the operator can do about it.
    """

    remedy = "restore the state directory from a backup"

    def line(self) -> str:
        return f"corrupt state: {self}; {self.remedy}"


class TrainingDiverged(RuntimeError):
    """Training cannot take a finite step even from the last good checkpoint: the runner ends
    with exit 1 and one line, for the supervisor to start it afresh (a loop of restores that
    never trains would look alive forever)."""


class DataUnreachable(RuntimeError):
    """Where the training data is kept did not answer (a bucket down, a network gone). At
    start-up the runner waits, not ready, and tries again; while training, the fetch was
    retried already, so the run ends (exit 1) and the next start waits."""


class DataRefused(CorruptState):
    """A piece of the training data does not match its dataset's index (a shard of another
    size or checksum, fetched twice): restarting would read the same bytes."""

    remedy = "prepare the dataset again (minerd data prepare) or restore its shards"
