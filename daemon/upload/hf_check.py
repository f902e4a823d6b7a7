"""What a validator does with a Hugging Face revision: load it offline, run it once.

A revision whose manifest lists ``config.json`` is in the Hugging Face layout. Its
files are fetched from the target (they are read in place from a local target), then
``AutoTokenizer.from_pretrained`` and ``AutoModelForCausalLM.from_pretrained`` load
them with no network, and a forward pass over a fixed text must give a finite loss.
The optimizer state is not needed for that and is not fetched.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, cast

from daemon.upload.layout import MODEL_FILE
from daemon.upload.revision import OPTIMIZER_FILE, read_manifest, read_pointer
from daemon.upload.storage import LocalStorage, Storage, StorageError

HF_CONFIG = "config.json"
# Code and prose, as the default corpus holds: any tokenizer gives it a few dozen tokens.
PROBE_TEXT = (
    'def add(a, b):\n    """Return the sum of a and b."""\n    return a + b\n\n'
    "The quick brown fox jumps over the lazy dog.\n"
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def check_latest(storage: Storage) -> list[str]:
    """Problems loading the revision LATEST names, for a target whose manifest already
    verified (pointer, manifest and checksums: ``revision.verify``)."""
    name = read_pointer(storage)
    manifest = read_manifest(storage, name) if name else None
    files = (manifest or {}).get("files")
    if not name or not isinstance(files, dict):
        return []
    return check_loadable(storage, name, files)


def check_loadable(storage: Storage, name: str, files: dict[str, Any]) -> list[str]:
    """Problems loading revision ``name`` as a validator would; empty when it loads and runs."""
    if HF_CONFIG not in files or MODEL_FILE not in files:  # no weights: the artifact's check covers it
        return []
    where = f"{storage.describe()}: {name}"
    with tempfile.TemporaryDirectory(prefix="minerd-verify-") as tmp:
        if isinstance(storage, LocalStorage):
            folder = storage.root / name
        else:
            folder = Path(tmp)
            for fname in files:
                if fname == OPTIMIZER_FILE:
                    continue
                try:
                    data = storage.get_bytes(f"{name}/{fname}")
                except StorageError as exc:
                    return [f"{where}/{fname}: unreadable: {exc}"]
                if data is None:
                    return [f"{where}/{fname}: missing"]
                (folder / fname).write_bytes(data)
        return _load_and_run(folder, where)


def _load_and_run(folder: Path, where: str) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a check's output is its one line, not a loading bar on stderr

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # any failure to load is the finding, whatever the library raises
        return [f"{where}: AutoTokenizer.from_pretrained fails: {_first_line(exc)}"]
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    except Exception as exc:
        return [f"{where}: AutoModelForCausalLM.from_pretrained fails: {_first_line(exc)}"]
    ids = tok(PROBE_TEXT, return_tensors="pt").input_ids
    if ids.shape[1] < 2:
        return [f"{where}: the tokenizer turns the probe text into {ids.shape[1]} token(s)"]
    if int(ids.max()) >= int(cast(torch.nn.Embedding, model.get_input_embeddings()).num_embeddings):
        return [f"{where}: the tokenizer yields ids beyond the model's vocabulary"]
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    if not math.isfinite(loss):
        return [f"{where}: the forward pass on a fixed text gives a non-finite loss ({loss})"]
    return []
