"""Upload gate and publisher.

The trainer::

    uploader = Uploader.from_config(cfg.upload, cfg.state_dir, registry, config_hash=cfg.digest())
    uploader.start()
    ...  # after each optimizer step:
    uploader.on_inner_step(outer_step, inner_step, loss, model, optimizer)
    ...
    uploader.stop(timeout=cfg.shutdown.deadline_seconds)

The CLI: ``verify_target(target, endpoint_url)`` returns one line per problem.
"""

from __future__ import annotations

from daemon.upload.gate import GateDecision, GateState, decide
from daemon.upload.revision import verify
from daemon.upload.storage import LocalStorage, S3Storage, Storage, StorageError, open_storage
from daemon.upload.uploader import Uploader


def verify_target(target: str, endpoint_url: str | None = None) -> list[str]:
    """Check a published target (a directory or s3://bucket/prefix) the way a
    validator would: pointer, manifest, every file's size and sha256; then a revision in
    the Hugging Face layout must load with ``from_pretrained`` and run, and a pseudo-gradient
    must decode to finite tensors of the model's shapes. Empty = OK."""
    from daemon.upload.artifact_check import check_artifact
    from daemon.upload.hf_check import check_latest

    try:
        storage = open_storage(target, endpoint_url or "")
    except StorageError as exc:
        return [f"{target}: {exc}"]
    try:
        return verify(storage) or check_latest(storage) or check_artifact(storage)
    except StorageError as exc:
        return [f"{storage.describe()}: unreadable: {exc}"]


__all__ = [
    "GateDecision",
    "GateState",
    "LocalStorage",
    "S3Storage",
    "Storage",
    "StorageError",
    "Uploader",
    "decide",
    "verify_target",
]
