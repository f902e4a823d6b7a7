"""The uploader: the gate on the training thread, the publisher in the background.

The trainer calls ``on_inner_step(...)`` after every optimizer step. On the
training thread that costs the gate (a few comparisons), and on an allowed
step a finiteness check of the parameters plus a copy of the model and
optimizer state into reused CPU buffers. Serialising, hashing and storing run
on the publisher thread; the training step never waits for storage.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog
import torch
from prometheus_client import CollectorRegistry

from daemon import __version__, disk
from daemon.compression import CodecSpec, CompressionStats
from daemon.config import UploadConfig
from daemon.disk import DiskFullReporter
from daemon.storage import (
    MANIFEST,
    POINTER,
    LocalStorage,
    S3Storage,
    Storage,
    StorageError,
    revision_key,
)
from daemon.upload.gate import GateDecision, GateState, decide
from daemon.upload.layout import RevisionLayout, WeightsLayout
from daemon.upload.metrics import UploadMetrics, UploadStateCollector
from daemon.upload.revision import (
    Snapshot,
    SnapshotBuffers,
    manifest_bytes,
    params_finite,
    read_manifest,
    read_pointer,
    write_revision,
)

log = structlog.get_logger(__name__)

PUBLISHER_NICE = 10


class Uploader:
    """Gate + background publisher + status, for one target."""

    name = "upload"

    def __init__(
        self,
        cfg: UploadConfig,
        storage: Storage,
        staging_dir: Path,
        registry: CollectorRegistry,
        version: str = __version__,
        config_hash: str = "",
        clock: Callable[[], float] = time.time,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        layout: RevisionLayout | None = None,
        on_disk_full: DiskFullReporter | None = None,
        codec: CodecSpec | None = None,
        stats: CompressionStats | None = None,
    ) -> None:
        """``codec`` encodes the pseudo-gradient artifact (``upload.artifact`` pseudo_gradient
        or both); ``stats`` counts what it wrote."""
        self.cfg = cfg
        self.layout = layout or WeightsLayout()
        if cfg.artifact != "weights" and codec is None:  # the default settings of the configured codec
            codec = replace(CodecSpec(), name=cfg.compression)
        self.codec = codec if cfg.artifact != "weights" else None
        self.stats = stats
        self._on_disk_full = on_disk_full or DiskFullReporter()
        self.storage = storage
        self.staging_dir = Path(staging_dir)
        self.version = version
        self.config_hash = config_hash
        self._clock = clock
        self._backoff = (backoff_base, backoff_max)
        self.metrics = UploadMetrics(registry)
        registry.register(UploadStateCollector(self._live_state))
        self._buffers = SnapshotBuffers()
        # The task's record of the data a revision at a global step was trained on (None: none).
        self.data_record: Callable[[int], dict[str, Any]] | None = None
        self._queue: queue.Queue[Snapshot | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        # Everything below is shared with the publisher thread; guarded by _cond.
        self._in_progress: str | None = None
        self._requested = False
        self._last_published: tuple[int, int] | None = None
        self._last_name: str | None = None
        self._last_time: float | None = None
        self._started_at = clock()
        self._blocked_reason: str | None = None
        self._logged_reason: str | None = None
        self._stale_logged = False
        self._uploads = 0
        self._failures = 0
        self._last_error: str | None = None

    @classmethod
    def from_config(
        cls,
        cfg: UploadConfig,
        state_dir: str | Path,
        registry: CollectorRegistry,
        version: str = __version__,
        config_hash: str = "",
        **kwargs: Any,
    ) -> Uploader:
        """Build from ``upload`` config. Raises StorageError (one line) when the s3
        backend cannot be set up, e.g. credentials missing from the environment."""
        state = Path(state_dir)
        target = cfg.target or str(state / "uploads")
        storage: Storage
        if cfg.backend == "s3" and cfg.enabled:
            storage = S3Storage(target, cfg.endpoint_url)
            staging = state / "upload-staging"
        else:
            # Staging under the target keeps it on one filesystem: files are
            # hard-linked into the revision, not copied.
            storage = LocalStorage(Path(target))
            staging = Path(target) / ".staging"
        return cls(cfg, storage, staging, registry, version, config_hash, **kwargs)

    # ---- lifecycle -------------------------------------------------------

    def start(self) -> None:
        """Learn what is already published (so the gate and the age are honest
        after a restart), clear leftovers of a killed publisher, start the thread."""
        if not self.cfg.enabled:
            log.warning("UPLOAD DISABLED: upload.enabled is false; nothing will be published.")
            return
        _own_empty_dir(self.staging_dir, create=False)  # leftovers of a killed publisher go
        try:
            name = read_pointer(self.storage)
            key = revision_key(name) if name else None
            manifest = read_manifest(self.storage, name) if name and key else None
        except (StorageError, ValueError, UnicodeDecodeError) as exc:
            log.warning(f"UPLOAD: cannot read the published target yet: {exc}", target=self.storage.describe())
            name, key, manifest = None, None, None
        with self._cond:
            if key is not None:
                self._last_published, self._last_name = key, name
                when = (manifest or {}).get("created_at_unix")
                self._last_time = float(when) if isinstance(when, int | float) else None
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="minerd-upload", daemon=True)
        self._thread.start()
        log.info(
            "upload publisher started",
            target=self.storage.describe(),
            latest=self._last_name,
            min_inner_step=self.cfg.min_inner_step,
            every_inner_steps=self.cfg.every_inner_steps,
        )

    def stop(self, timeout: float = 30.0) -> bool:
        """Let an upload in flight finish within ``timeout`` (retries are not started
        any more); True when the publisher thread has ended."""
        if self._thread is None:
            return True
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout)
        alive = self._thread.is_alive()
        if alive:
            log.warning("upload publisher still busy at the stop deadline", revision=self._in_progress)
        return not alive

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no upload is in flight (tests, benchmarks, shutdown)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._in_progress is None, timeout)

    # ---- training thread -------------------------------------------------

    def request_upload(self) -> None:
        """Ask for an upload on the next inner step, off schedule but through the
        rest of the gate (POST /control/upload). Thread-safe."""
        with self._cond:
            self._requested = True
        log.info("upload requested; the gate decides on the next inner step")

    def on_inner_step(
        self,
        outer_step: int,
        inner_step: int,
        loss: float,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        force: bool = False,
        anchor: Sequence[torch.Tensor] | None = None,
        global_step: int | None = None,
    ) -> GateDecision:
        """Call after each optimizer step. Returns the gate's decision; when it is
        allowed, a snapshot has been taken and handed to the publisher. ``anchor``: the
        outer round's starting weights (``model.parameters()`` order), which the
        pseudo-gradient artifact needs."""
        with self._cond:
            forced = force or self._requested
            self._requested = False
            state = GateState(
                outer_step,
                inner_step,
                float(loss),
                in_progress=self._in_progress is not None,
                last_published=self._last_published,
                forced=forced,
                seconds_since_last=None if self._last_time is None else self._clock() - self._last_time,
            )
        decision = decide(self.cfg, state)
        # The parameter scan is the only per-tensor work of the gate: only when all
        # else allows (on CUDA it is one host sync).
        if decision.allowed and not params_finite(model.parameters()):
            decision = decide(self.cfg, replace(state, params_finite=False))
        self._check_stale()
        if not decision.allowed:
            self._blocked(decision, forced)
            return decision
        artifact = self.cfg.artifact
        if artifact != "weights" and anchor is None:
            raise ValueError("upload.artifact needs the outer round's starting weights (anchor)")
        weights = artifact != "pseudo_gradient"
        snap = self._buffers.capture(outer_step, inner_step, float(loss), model,
                                     optimizer if weights else None,
                                     anchor=anchor if artifact != "weights" else None, weights=weights)
        if self.data_record is not None and global_step is not None:
            snap.data = self.data_record(global_step)
        with self._cond:
            self._in_progress = snap.name
            self._blocked_reason = None
            self._logged_reason = None
        self._queue.put(snap)
        return decision

    def _blocked(self, decision: GateDecision, forced: bool) -> None:
        self.metrics.blocked.labels(reason=decision.reason).inc()
        if decision.quiet:
            return
        self.metrics.attempts.labels(result="blocked").inc()
        with self._cond:
            self._blocked_reason = decision.reason
            changed = decision.reason != self._logged_reason
            self._logged_reason = decision.reason
        if changed or forced:
            log.warning(decision.message, reason=decision.reason, requested=forced)

    # ---- age -------------------------------------------------------------

    def _age(self, now: float) -> tuple[float | None, bool]:
        """(seconds since the last publish or None, stale?). Plain float
        subtraction of Unix times: total seconds, days included."""
        with self._cond:
            last = self._last_time
        if last is not None:
            age = now - last
            return age, age > self.cfg.max_age_seconds
        return None, self.cfg.enabled and now - self._started_at > self.cfg.max_age_seconds

    def _check_stale(self) -> None:
        now = self._clock()
        age, stale = self._age(now)
        if stale and not self._stale_logged:
            since = f"last upload {age:.0f}s ago" if age is not None else "no upload since start"
            log.warning(
                f"UPLOAD STALE: {since}, over upload.max_age_seconds ({self.cfg.max_age_seconds:.0f}s). "
                "Validators will reject this repo age!",
                age_seconds=age,
            )
        self._stale_logged = stale

    def _live_state(self) -> dict[str, Any]:
        age, stale = self._age(self._clock())
        with self._cond:
            busy = self._in_progress is not None
        return {"age_seconds": age, "stale": stale, "in_progress": busy}

    def status(self) -> dict[str, Any]:
        """The upload section of /status (JSON-serialisable)."""
        age, stale = self._age(self._clock())
        with self._cond:
            return {
                "enabled": self.cfg.enabled,
                "backend": self.cfg.backend,
                "target": self.storage.describe(),
                "last_revision": self._last_name,
                "last_upload_timestamp": self._last_time,
                "age_seconds": None if age is None else round(age, 3),
                "stale": stale,
                "max_age_seconds": self.cfg.max_age_seconds,
                "blocked_reason": self._blocked_reason if self.cfg.enabled else "disabled",
                "in_progress": self._in_progress is not None,
                "in_progress_revision": self._in_progress,
                "upload_requested": self._requested,
                "uploads": self._uploads,
                "failures": self._failures,
                "last_error": self._last_error,
            }

    # ---- publisher thread ------------------------------------------------

    def _run(self) -> None:
        # Serialising and hashing compete with the training step for CPU; on a
        # crowded host the step should win (repo-age limits are tens of minutes).
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PUBLISHER_NICE)
        while True:
            snap = self._queue.get()
            if snap is None:
                break
            try:
                self._publish(snap)
            except Exception as exc:  # a single failed revision must not kill the publisher
                log.exception(f"UPLOAD FAILED: {snap.name}: unexpected error: {exc}")
                self._failed(snap.name, 0, exc)
            finally:
                with self._cond:
                    self._in_progress = None
                    self._cond.notify_all()
        log.info("upload publisher stopped")

    def _publish(self, snap: Snapshot) -> None:
        name, target = snap.name, self.storage.describe()
        log.info(
            f"UPLOAD START: {name} (outer {snap.outer_step}, inner {snap.inner_step}) to {target}",
            revision=name,
        )
        t0 = time.perf_counter()
        folder = self.staging_dir / name
        try:
            if self.staging_dir.is_symlink():  # swapped for a link since start
                _own_empty_dir(self.staging_dir)
            _own_empty_dir(folder)
            files, manifest = write_revision(snap, folder, self.version, self.config_hash, self.layout,
                                             self.codec, self.stats, self.cfg.shard_bytes)
            nbytes = sum(int(e["size"]) for e in manifest["files"].values())
            tries = self.cfg.retries + 1
            for attempt in range(1, tries + 1):
                try:
                    self._store(name, files, manifest)
                except (OSError, StorageError) as exc:
                    if disk.is_full(exc):  # a full local target: the next allowed step tries again
                        self._on_disk_full("upload revision", Path(self.storage.describe()), exc)
                        self._failed(name, attempt, exc)
                        return
                    if attempt == tries:
                        self._failed(name, attempt, exc)
                        return
                    delay = self._delay(attempt)
                    log.warning(
                        f"UPLOAD RETRY: {name} attempt {attempt}/{tries} failed: {exc}; retrying in {delay:.1f}s",
                        revision=name,
                    )
                    if self._stop.wait(delay):
                        self._failed(name, attempt, exc)
                        return
                    continue
                self._succeeded(snap, nbytes, time.perf_counter() - t0, attempt)
                return
        except OSError as exc:  # serialising into staging: disk full, permissions
            if disk.is_full(exc):
                self._on_disk_full("upload revision", self.staging_dir, exc)
            self._failed(name, 0, exc)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _delay(self, attempt: int) -> float:
        base, cap = self._backoff
        # Exponential with jitter (half fixed, half random) so miners sharing an
        # endpoint do not retry in lock-step.
        return min(cap, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)

    def _store(self, name: str, files: dict[str, Path], manifest: dict[str, Any]) -> None:
        """Files, then the manifest, then the pointer: a reader following LATEST
        only ever finds a whole revision. Every attempt writes every file, so a
        server that lost state in between still ends up with the whole revision."""
        for fname, path in files.items():
            self.storage.put_file(f"{name}/{fname}", path)
        self.storage.put_bytes(f"{name}/{MANIFEST}", manifest_bytes(manifest))
        self.storage.put_bytes(POINTER, f"{name}\n".encode())

    def _succeeded(self, snap: Snapshot, nbytes: int, seconds: float, attempts: int) -> None:
        now = self._clock()
        with self._cond:
            self._last_published = (snap.outer_step, snap.inner_step)
            self._last_name = snap.name
            self._last_time = now
            self._uploads += 1
            self._last_error = None
        self.metrics.attempts.labels(result="ok").inc()
        self.metrics.duration.observe(seconds)
        self.metrics.bytes.inc(nbytes)
        self.metrics.last_timestamp.set(now)
        log.info(
            f"UPLOAD OK: {snap.name} published, {nbytes / 1e6:.1f} MB in {seconds:.1f}s",
            revision=snap.name,
            bytes=nbytes,
            seconds=round(seconds, 3),
            attempts=attempts,
        )
        self._prune(snap)

    def _failed(self, name: str, attempts: int, exc: BaseException) -> None:
        with self._cond:
            self._failures += 1
            self._last_error = f"{name}: {exc}"
            previous = self._last_name
        self.metrics.attempts.labels(result="failed").inc()
        log.error(
            f"UPLOAD FAILED: {name} after {attempts} attempt(s): {exc}. Dropped; LATEST still names "
            f"{previous or 'nothing'}; the next allowed step publishes again.",
            revision=name,
        )

    def _prune(self, snap: Snapshot) -> None:
        """Keep the newest ``keep`` revisions up to the one just published (which
        LATEST names); never touch newer leftovers, which a later publish overwrites."""
        current = (snap.outer_step, snap.inner_step)
        try:
            names = self.storage.list_revisions()
            keyed = sorted((k, n) for n in names if (k := revision_key(n)) is not None and k <= current)
            for _, old in keyed[: -self.cfg.keep]:
                if old != snap.name:
                    self.storage.delete_revision(old)
        except (OSError, StorageError) as exc:
            log.warning(f"upload: pruning old revisions failed: {exc}", revision=snap.name)


def _own_empty_dir(path: Path, create: bool = True) -> None:
    """Make ``path`` an empty directory of our own (or nothing, with ``create`` off). The publisher
    writes into staging and then deletes from it: a symbolic link there (stray or planted) is
    removed, never followed."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        log.warning("upload staging path was not a plain directory; replacing it", path=str(path))
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)
    if create:
        path.mkdir(parents=True, exist_ok=True)
