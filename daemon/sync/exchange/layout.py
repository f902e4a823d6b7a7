"""What the exchange target holds, and how its files are written and read back.

```
global/round-<R>/   model files (the task's revision layout), outer.safetensors (the outer
                    optimizer's momentum), round.json; manifest.json last (sha256 of each)
global/LATEST       "round-<R>", written last
rounds/<R>/<miner>/ pseudo_gradient.safetensors + pseudo_gradient.json (the upload codec's
                    artifact), submission.json; manifest.json last
rounds/<R>/scores.json   the aggregator's verdict on each submission of round R
```

Everything read from a target is untrusted (anyone with write access to the bucket may have
put it there): every read is bounded before it happens, JSON is parsed with a depth limit,
tensors come from safetensors only, and a folder counts only when its manifest lists each
file with a size and sha256 that the bytes fetched match.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.storage import Storage, StorageError, TooLarge, check_key

FORMAT = 1
POINTER = "global/LATEST"
MANIFEST = "manifest.json"
ROUND_FILE = "round.json"
SUBMISSION_FILE = "submission.json"
SCORES_FILE = "scores.json"
OUTER_FILE = "outer.safetensors"
ROUND_RE = re.compile(r"^round-([0-9]{1,9})$")
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_JSON_BYTES = 1 << 20  # a manifest, a round or submission record, a pointer
MAX_FILES = 64  # files one folder may list
MAX_SUBMISSIONS = 1000  # folders of one round looked at


class Refused(Exception):
    """A file or folder of the target that is not what it should be: one line saying why."""


def global_folder(round_: int) -> str:
    return f"global/round-{round_}"


def submission_folder(round_: int, miner: str) -> str:
    return f"rounds/{round_}/{miner}"


def scores_key(round_: int) -> str:
    return f"rounds/{round_}/{SCORES_FILE}"


def file_entry(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        return {"size": path.stat().st_size, "sha256": hashlib.file_digest(fh, "sha256").hexdigest()}


def dumps(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def loads(raw: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise Refused(f"{where}: not JSON ({str(exc)[:80]})") from None
    if not isinstance(doc, dict):
        raise Refused(f"{where}: not a JSON object")
    return doc


def read_json(storage: Storage, key: str) -> dict[str, Any] | None:
    """A small JSON object of the target, None when absent; Refused when over its bound or bad."""
    try:
        raw = storage.get_bytes(key, MAX_JSON_BYTES)
    except TooLarge as exc:
        raise Refused(f"{key}: {exc}") from None
    return None if raw is None else loads(raw, key)


def publish(storage: Storage, folder: str, local: Path, names: list[str]) -> None:
    """``local``'s files ``names`` into ``folder``, then the manifest listing them (last)."""
    entries = {name: file_entry(local / name) for name in names}
    for name in names:
        storage.put_file(f"{folder}/{name}", local / name)
    storage.put_bytes(f"{folder}/{MANIFEST}", dumps({"format": FORMAT, "files": entries}))


def fetch(storage: Storage, folder: str, dest: Path, max_bytes: dict[str, int]) -> dict[str, Path]:
    """The files of ``folder`` its manifest lists, each fetched into ``dest`` with its size and
    sha256 checked; ``max_bytes``: the most each named file may hold ("*": any other file; a
    file not named is refused without it). Refused with the first problem."""
    manifest = read_json(storage, f"{folder}/{MANIFEST}")
    if manifest is None:
        raise Refused(f"{folder}/{MANIFEST}: missing")
    files = manifest.get("files")
    if manifest.get("format") != FORMAT or not isinstance(files, dict) or len(files) > MAX_FILES:
        raise Refused(f"{folder}/{MANIFEST}: not a manifest of format {FORMAT} listing at most {MAX_FILES} files")
    out = {}
    for name, entry in files.items():
        if not isinstance(name, str) or not FILE_RE.fullmatch(name) or name == MANIFEST:
            raise Refused(f"{folder}/{MANIFEST}: names {str(name)[:80]!r}, not a plain file name")
        cap = max_bytes.get(name, max_bytes.get("*"))
        if cap is None:
            raise Refused(f"{folder}/{MANIFEST}: lists {name}, which does not belong here")
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or not isinstance(
                entry.get("sha256"), str):
            raise Refused(f"{folder}/{MANIFEST}: {name}: no size and sha256")
        if not 0 <= entry["size"] <= cap:
            raise Refused(f"{folder}/{name}: {entry['size']} bytes, over the {cap} it may hold")
        check_key(f"{folder}/{name}")
        try:
            got = storage.fetch(f"{folder}/{name}", dest / name, entry["size"])
        except TooLarge:
            raise Refused(f"{folder}/{name}: larger than its manifest says") from None
        except StorageError as exc:
            raise Refused(f"{folder}/{name}: unreadable ({exc})") from None
        if got is None:
            raise Refused(f"{folder}/{name}: missing")
        if got != (entry["size"], entry["sha256"]):
            raise Refused(f"{folder}/{name}: does not match its manifest (size or sha256)")
        out[name] = dest / name
    return out


def read_pointer(storage: Storage) -> int | None:
    """The round ``global/LATEST`` names; None when there is none; Refused when it is not one."""
    try:
        raw = storage.get_bytes(POINTER, 64)
    except TooLarge:
        raise Refused(f"{POINTER}: over 64 bytes") from None
    if raw is None:
        return None
    m = ROUND_RE.fullmatch(raw.decode("ascii", "replace").strip())
    if m is None:
        raise Refused(f"{POINTER}: does not name a round (got {raw[:40]!r})")
    return int(m.group(1))


@dataclass(frozen=True)
class RoundInfo:
    """``round.json``: what a global revision is and what submissions to it must match."""

    round: int
    applicability: str  # the digest of what makes a submission applicable (model shapes, tokenizer, data)
    inner_steps: int
    opened_at: float  # the aggregator's clock when it published this round
    held_out_loss: float | None
    accepted: int
    submitted: int

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **self.__dict__}

    @classmethod
    def parse(cls, doc: dict[str, Any], where: str) -> RoundInfo:
        try:
            info = cls(int(doc["round"]), str(doc["applicability"]), int(doc["inner_steps"]),
                       float(doc["opened_at"]), None if doc.get("held_out_loss") is None
                       else float(doc["held_out_loss"]), int(doc.get("accepted", 0)), int(doc.get("submitted", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise Refused(f"{where}: not a round record ({type(exc).__name__}: {str(exc)[:80]})") from None
        if doc.get("format") != FORMAT or not re.fullmatch(r"[0-9a-f]{16,64}", info.applicability):
            raise Refused(f"{where}: not a round record of format {FORMAT}")
        return info


def applicability(task: str, shapes: dict[str, list[int]], dataset: str | None) -> str:
    """What a submission and a global revision must share to be applied to each other: the
    task, every parameter's shape, and the dataset (whose digest names its tokenizer). Not the
    optimiser's settings: learning rate, warm-up and batch size are each miner's to tune."""
    blob = json.dumps({"task": task, "shapes": shapes, "dataset": dataset}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
