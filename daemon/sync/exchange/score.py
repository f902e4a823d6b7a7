"""Scoring one submission as a validator does: what the aggregator runs on every submission.

A submission is read as hostile (bounded, manifest-checked, safetensors and JSON only), its
structure checked exactly as ``minerd verify-upload`` checks a pseudo-gradient artifact
(known codec, the model's shapes, the encoder's layout, indices inside their blocks, values
that decode finite), its record checked against the round (the base round, the applicability
digest), and then its decoded pseudo-gradient applied alone to the round's global weights:
the held-out loss before and after says whether it helps.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from daemon.compression import artifact
from daemon.compression.codec import Encoded, decode
from daemon.storage import Storage
from daemon.sync.exchange.layout import (
    MAX_JSON_BYTES,
    SUBMISSION_FILE,
    Refused,
    fetch,
    file_entry,
    loads,
    submission_folder,
)
from daemon.sync.exchange.weights import named_params, shapes


# The most bytes a submission's tensors may take: its float32 pseudo-gradient sent dense.
def artifact_cap(model: nn.Module) -> int:
    return sum(p.numel() * 4 for p in model.parameters()) + (1 << 20)


@dataclass
class Verdict:
    miner: str
    accepted: bool
    reason: str  # "accepted", or why not: structure, stale_round, foreign, copy, not_finite, no_improvement
    detail: str = ""
    loss_before: float | None = None
    loss_after: float | None = None
    own_loss_before: float | None = None  # on the miner's replayed samples (not measured yet)
    own_loss_after: float | None = None
    weight: float = 0.0
    sha256: str = ""  # of its pseudo_gradient.safetensors, to find copies
    bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Submission:
    miner: str
    record: dict[str, Any]
    pseudo_gradient: dict[str, torch.Tensor]  # decoded, by parameter name
    sha256: str
    bytes: int


def read_submission(storage: Storage, round_: int, miner: str, model: nn.Module, applicability: str
                    ) -> Submission:
    """Fetch, check and decode a miner's submission to ``round_``; Refused(reason: detail)."""
    folder = submission_folder(round_, miner)
    caps = {artifact.TENSORS_FILE: artifact_cap(model), artifact.HEADER_FILE: MAX_JSON_BYTES,
            SUBMISSION_FILE: MAX_JSON_BYTES}
    with tempfile.TemporaryDirectory(prefix="minerd-submission-") as tmp:
        try:
            files = fetch(storage, folder, Path(tmp), caps)
        except Refused as exc:
            raise Refused(f"structure: {exc}") from None
        if set(files) != set(caps):
            raise Refused(f"structure: {folder} lacks {sorted(set(caps) - set(files))}")
        record = loads(files[SUBMISSION_FILE].read_bytes(), f"{folder}/{SUBMISSION_FILE}")
        if record.get("miner_id") != miner:
            raise Refused(f"structure: {folder}/{SUBMISSION_FILE} names miner {str(record.get('miner_id'))[:64]!r}")
        if record.get("round") != round_:
            raise Refused(f"stale_round: made for round {str(record.get('round'))[:20]}, not {round_}")
        if record.get("applicability") != applicability:
            raise Refused("foreign: made for another model, tokenizer or dataset (applicability digest "
                          f"{str(record.get('applicability'))[:16]}, not {applicability[:16]})")
        header = loads(files[artifact.HEADER_FILE].read_bytes(), f"{folder}/{artifact.HEADER_FILE}")
        try:
            tensors = artifact.TensorFile(files[artifact.TENSORS_FILE])
            found = artifact.problems(header, tensors, shapes(model))
            if found:
                kind = "not_finite" if "not finite" in found[0] else "structure"
                raise Refused(f"{kind}: {folder}/{artifact.TENSORS_FILE}: {found[0]}")
            dense = decode(Encoded({k: tensors[k] for k in tensors}, header))
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
            raise Refused(f"structure: {folder}/{artifact.TENSORS_FILE}: unreadable ({str(exc)[:80]})") from None
        if not all(bool(torch.isfinite(t).all()) for t in dense.values()):
            raise Refused("not_finite: the pseudo-gradient decodes to non-finite values")
        entry = file_entry(files[artifact.TENSORS_FILE])
    return Submission(miner, record, dense, entry["sha256"], entry["size"])


@torch.no_grad()
def loss_with(model: nn.Module, pseudo_gradient: dict[str, torch.Tensor], evaluate: Callable[[nn.Module], float]
              ) -> float:
    """The held-out loss of the global weights minus ``pseudo_gradient`` (the miner's own
    weights again, within the codec's error); the model is left as it was."""
    params = named_params(model)
    saved = {n: params[n].detach().clone() for n in pseudo_gradient}
    try:
        for name, g in pseudo_gradient.items():
            params[name].sub_(g.to(params[name].device, params[name].dtype))
        return evaluate(model)
    finally:
        for name, value in saved.items():
            params[name].copy_(value)
