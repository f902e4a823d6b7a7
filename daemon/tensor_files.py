"""Tensors on disk as one safetensors file, or as numbered shards with an index, the way
``save_pretrained`` writes a large model.

Up to ``shard_bytes`` of tensors: ``<stem>.safetensors``. Above it: ``<stem>-00001-of-0000N
.safetensors`` ... and ``<stem>.safetensors.index.json`` (``{"metadata": {"total_size": ...},
"weight_map": {tensor: file}}``), which transformers' ``from_pretrained`` follows. The split is
planned by huggingface_hub (``split_torch_state_dict_into_shards``, what ``save_pretrained``
itself calls), so the files are the ones transformers would cut; a tensor larger than
``shard_bytes`` gets a shard of its own.

The weights of a revision (``daemon/upload/layout.py``) and its pseudo-gradient
(``daemon/compression/artifact.py``) are both written here: this module sits below both, so
neither imports the other. How a validator checks what it reads back: ``daemon/upload/verify.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from daemon import atomic
from daemon.disk import save_safetensors


def single_name(stem: str) -> str:
    return f"{stem}.safetensors"


def index_name(stem: str) -> str:
    return f"{stem}.safetensors.index.json"


def shard_pattern(stem: str) -> re.Pattern[str]:
    """A shard's name: ``<stem>-<k>-of-<n>.safetensors``, five ASCII digits each (group 1: k, 2: n)."""
    return re.compile(rf"{re.escape(stem)}-([0-9]{{5}})-of-([0-9]{{5}})\.safetensors")


def write(tensors: dict[str, torch.Tensor], folder: Path, stem: str, shard_bytes: int | None = None,
          metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``tensors`` into ``folder``, each file atomically; return the names written. With
    ``shard_bytes`` None they go into one file, whatever their size."""
    if shard_bytes is None or not tensors:  # huggingface_hub plans no file at all for no tensors
        _save(tensors, folder / single_name(stem), metadata)
        return [single_name(stem)]
    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern=f"{stem}{{suffix}}.safetensors", max_shard_size=shard_bytes)
    for fname, names in split.filename_to_tensors.items():
        _save({name: tensors[name] for name in names}, folder / fname, metadata)
    if not split.is_sharded:  # the one file is <stem>.safetensors
        return list(split.filename_to_tensors)
    # Written after the shards it names; the bytes save_pretrained gives an index.
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    atomic.write_bytes(folder / index_name(stem), (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    return [*split.filename_to_tensors, index_name(stem)]


def stored(names: Collection[str], stem: str) -> list[str]:
    """The files among ``names`` that hold ``stem``'s tensors: its single file, else its shards
    in order (empty: neither). Which of them the index really names is the verifier's check."""
    if single_name(stem) in names:
        return [single_name(stem)]
    pattern = shard_pattern(stem)
    return sorted(name for name in names if pattern.fullmatch(name))


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None) -> None:
    atomic.write_with(path, lambda tmp: save_safetensors(tensors, tmp, metadata))
