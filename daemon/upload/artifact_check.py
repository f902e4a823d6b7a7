"""What a validator does with a pseudo-gradient artifact: decode it and check it fits the model.

Run by ``minerd verify-upload`` after the manifest's checksums held. The shapes are
checked against what the revision says of the model: the weights file's header when the
weights are there; else ``config.json`` (a Hugging Face model is built from it on the
meta device: shapes without memory); else ``model_shapes.json``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from daemon.compression import artifact
from daemon.upload.hf_check import HF_CONFIG, _first_line
from daemon.upload.layout import MODEL_FILE, SHAPES_FILE
from daemon.upload.revision import read_manifest, read_pointer, safetensors_header
from daemon.upload.storage import Storage, StorageError


def check_artifact(storage: Storage) -> list[str]:
    """Problems with the pseudo-gradient of the revision LATEST names; empty without one."""
    name = read_pointer(storage)
    manifest = read_manifest(storage, name) if name else None
    files = (manifest or {}).get("files")
    if not name or not isinstance(files, dict):
        return []
    where = f"{storage.describe()}: {name}"
    has_header, has_tensors = artifact.HEADER_FILE in files, artifact.TENSORS_FILE in files
    if not has_header and not has_tensors:
        return []
    if has_header != has_tensors:
        return [f"{where}: lists only one of {artifact.HEADER_FILE} and {artifact.TENSORS_FILE}"]
    try:
        raw_header = _get(storage, f"{name}/{artifact.HEADER_FILE}", artifact.MAX_HEADER_BYTES)
        raw_tensors = _get(storage, f"{name}/{artifact.TENSORS_FILE}", None)
    except (StorageError, ValueError) as exc:
        return [f"{where}: {exc}"]
    try:
        header = json.loads(raw_header)
    except ValueError as exc:
        return [f"{where}/{artifact.HEADER_FILE}: not valid JSON: {exc}"]
    try:
        tensors = load_safetensors(raw_tensors)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        return [f"{where}/{artifact.TENSORS_FILE}: unreadable: {_first_line(exc)}"]
    expected, complete, why = _model_shapes(storage, name, files)
    if why:
        return [f"{where}: {why}"]
    found = artifact.problems(header, tensors, expected, complete)
    return [f"{where}/{artifact.TENSORS_FILE}: {p}" for p in found]


def _get(storage: Storage, key: str, cap: int | None) -> bytes:
    data = storage.get_bytes(key)
    if data is None:
        raise ValueError(f"{key}: missing")
    if cap is not None and len(data) > cap:
        raise ValueError(f"{key}: {len(data)} bytes, over the {cap} a header may take")
    return data


def _model_shapes(storage: Storage, name: str, files: dict[str, Any]
                  ) -> tuple[dict[str, list[int]] | None, bool, str | None]:
    """(parameter name -> shape, whether every one must be in the artifact, a problem)."""
    if MODEL_FILE in files:
        entry = files[MODEL_FILE]
        size = entry.get("size") if isinstance(entry, dict) else None
        got = safetensors_header(storage, f"{name}/{MODEL_FILE}", size if isinstance(size, int) else -1)
        if isinstance(got, str):
            return None, False, f"{MODEL_FILE}: {got}"
        return {k: list(v.get("shape", [])) for k, v in got.items() if k != "__metadata__"}, False, None
    if HF_CONFIG in files:
        return _shapes_from_config(storage, name)
    if SHAPES_FILE in files:
        try:
            shapes = json.loads(_get(storage, f"{name}/{SHAPES_FILE}", artifact.MAX_HEADER_BYTES))
        except (StorageError, ValueError) as exc:
            return None, False, f"{SHAPES_FILE}: {exc}"
        if not isinstance(shapes, dict) or not all(isinstance(v, list) for v in shapes.values()):
            return None, False, f"{SHAPES_FILE}: not a mapping of names to shapes"
        return shapes, True, None
    return None, False, f"nothing to check the pseudo-gradient's shapes against ({MODEL_FILE}, {HF_CONFIG} " \
        f"or {SHAPES_FILE})"


def _shapes_from_config(storage: Storage, name: str) -> tuple[dict[str, list[int]] | None, bool, str | None]:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        raw = _get(storage, f"{name}/{HF_CONFIG}", artifact.MAX_HEADER_BYTES)
    except (StorageError, ValueError) as exc:
        return None, False, f"{HF_CONFIG}: {exc}"
    with tempfile.TemporaryDirectory(prefix="minerd-verify-") as tmp:
        (Path(tmp) / HF_CONFIG).write_bytes(raw)
        try:
            config = AutoConfig.from_pretrained(tmp, local_files_only=True)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        except Exception as exc:  # whatever the library raises, the config is the finding
            return None, False, f"{HF_CONFIG}: cannot build the model: {_first_line(exc)}"
    return {n: list(p.shape) for n, p in model.named_parameters()}, True, None
