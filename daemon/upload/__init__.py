"""Upload gate and publisher.

The trainer::

    uploader = Uploader.from_config(cfg.upload, cfg.state_dir, registry, config_hash=cfg.digest())
    uploader.start()
    ...  # after each optimizer step:
    uploader.on_inner_step(outer_step, inner_step, loss, model, optimizer)
    ...
    uploader.stop(timeout=cfg.shutdown.deadline_seconds)

The CLI: ``verify_target(target, endpoint_url)`` returns one line per problem; ``limits.py``
says what it accepts of an upload.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from daemon.storage import LocalStorage, S3Storage, Storage, StorageError, open_storage
from daemon.upload.gate import GateDecision, GateState, decide
from daemon.upload.limits import LIMITS, Limits
from daemon.upload.uploader import Uploader
from daemon.upload.verify import Revision, fetch_revision


def verify_target(target: str, endpoint_url: str | None = None, limits: Limits = LIMITS) -> list[str]:
    """Check a published target (a directory or s3://bucket/prefix) the way a
    validator would: pointer, manifest, every file's size and sha256; then a revision in
    the Hugging Face layout must load with ``from_pretrained`` and run, and a pseudo-gradient
    must decode to finite tensors of the model's shapes. Empty = OK.

    Every file is fetched once, into a temporary directory (under TMPDIR), and the checks
    after the checksums read those copies: the bytes checked are the bytes hashed."""
    try:
        storage = open_storage(target, endpoint_url or "")
    except StorageError as exc:
        return [f"{target}: {exc}"]
    with tempfile.TemporaryDirectory(prefix="minerd-verify-") as tmp:
        rev, problems = fetch_revision(storage, Path(tmp), limits)
        if rev is None:
            return problems
        return check_revision(rev, limits)


def check_revision(rev: Revision, limits: Limits = LIMITS) -> list[str]:
    """The checks after the checksums, on a revision whose files are verified copies in
    ``rev.folder``: an aggregator that fetched a submission its own way calls this."""
    from daemon.upload.artifact_check import check_artifact
    from daemon.upload.hf_check import check_loadable

    return check_loadable(rev, limits) or check_artifact(rev, limits)


__all__ = [
    "LIMITS",
    "GateDecision",
    "GateState",
    "Limits",
    "LocalStorage",
    "Revision",
    "S3Storage",
    "Storage",
    "StorageError",
    "Uploader",
    "check_revision",
    "decide",
    "verify_target",
]
