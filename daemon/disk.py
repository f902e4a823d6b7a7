"""Disk space: free bytes where the state lives, and what a full disk does to a write.

A full disk must not end the run: a supervisor would restart it into the same full
disk, again and again. So a write that fails for lack of room (ENOSPC, or a quota)
is reported as one ``DISK FULL:`` line with the path and the free bytes, counted in
``minerd_disk_full_total{what}``, and tried again at its next interval; the atomic
writes leave the previous checkpoint, revision or cache whole and no temporary file.
``minerd_disk_free_bytes{path}`` is read at scrape time, for the alert that fires
before a checkpoint no longer fits.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog
import torch
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from safetensors import SafetensorError
from safetensors.torch import save_file

log = structlog.get_logger("minerd.disk")

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in FULL_ERRNOS


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the file system holding ``path`` (or its
    nearest existing parent); None when nothing along it exists."""
    for p in (path, *path.parents):
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


class DiskMetrics:
    """``minerd_disk_full_total{what}`` and, read at scrape time, ``minerd_disk_free_bytes{path}``."""

    def __init__(self, registry: CollectorRegistry, state_dir: Path) -> None:
        self.full = Counter("minerd_disk_full", "Writes that found the disk full, by what was written",
                            ["what"], registry=registry)
        registry.register(_FreeCollector(state_dir))


class _FreeCollector(Collector):
    def __init__(self, state_dir: Path) -> None:
        self._dir = state_dir

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("minerd_disk_free_bytes", "Free bytes where the state directory lives",
                                 labels=["path"])

    def describe(self) -> Iterator[Metric]:
        # Declared even while nothing along the path exists, so a clash shows at registration.
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        free = free_bytes(self._dir)
        if free is not None:
            fam = self._family()
            fam.add_metric([str(self._dir)], float(free))
            yield fam


class DiskFullReporter:
    """Says ``DISK FULL:`` once per failed write and counts it; handed to whatever writes."""

    def __init__(self, metrics: DiskMetrics | None = None) -> None:
        self._metrics = metrics

    def __call__(self, what: str, path: Path, exc: BaseException) -> None:
        free = free_bytes(path)
        shown = f"{free} bytes free" if free is not None else "free space unknown"
        log.error(f"DISK FULL: {what} not written to {path} ({shown}); the previous one stays, "
                  "retrying at the next interval. Free some space: old uploads, checkpoints, caches.",
                  what=what, path=str(path), free_bytes=free, error=str(exc))
        if self._metrics is not None:
            self._metrics.full.labels(what=what).inc()


def wait_for_room(
    path: Path,
    needed: int,
    why: str,
    stop_requested: Callable[[], bool],
    on_wait: Callable[[str | None], None],
    poll_seconds: float = 1.0,
    repeat_seconds: float = 300.0,
) -> bool:
    """Block until ``needed`` bytes are free at ``path``; False if a stop came first.

    While it waits, ``on_wait(reason)`` tells the readiness probe why (``None`` once there
    is room), and a ``DISK FULL:`` line repeats every ``repeat_seconds``: waiting beats
    exiting, which a supervisor would answer with a restart into the same full disk.
    """
    last_said = -repeat_seconds
    while True:
        free = free_bytes(path)
        if free is None or free >= needed:
            on_wait(None)
            return True
        reason = f"disk full: {free} bytes free at {path}, {needed} needed for {why}"
        on_wait(reason)
        now = time.monotonic()
        if now - last_said >= repeat_seconds:
            last_said = now
            log.error(f"DISK FULL: {free} bytes free at {path}, {needed} needed for {why}; waiting for room "
                      "(/readyz answers 503 meanwhile)", path=str(path), free_bytes=free, needed_bytes=needed)
        if stop_requested():
            return False
        time.sleep(poll_seconds)


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
                     ) -> None:
    """safetensors' ``save_file``, with its I/O failures raised as the OSError they are: it reports
    a full disk as a SafetensorError that only says "(os error 28)" in its text."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        match = _OS_ERROR.search(str(exc))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None
