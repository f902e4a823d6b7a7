"""How a revision's model files are laid out: the task decides, the publisher writes.

The two-tower task publishes its weights as ``model.safetensors``; the language
model publishes the Hugging Face layout validators load with ``from_pretrained``
(``daemon/tasks/causal_lm/export.py``). Either way the publisher hashes every file
into the manifest and writes the manifest, then ``LATEST``, last.

Weights of more than ``upload.shard_bytes`` in all are written as ``save_pretrained`` writes
a large model: ``model-00001-of-0000N.safetensors`` ... and ``model.safetensors.index.json``
(``daemon/tensor_files.py``): one S3 PUT carries at most 5 GiB, and ``from_pretrained``
reads a large model this way. At or below the limit the weights stay one file.

A revision that carries the pseudo-gradient without the weights (``upload.artifact:
pseudo_gradient``) still describes the model, so that the artifact's shapes can be
checked against it: the Hugging Face layout writes its config and tokenizer files, the
plain layout ``model_shapes.json`` (parameter name -> shape).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch

from daemon import atomic, tensor_files

MODEL_STEM = "model"
MODEL_FILE = tensor_files.single_name(MODEL_STEM)  # model.safetensors
MODEL_INDEX_FILE = tensor_files.index_name(MODEL_STEM)  # model.safetensors.index.json
SHAPES_FILE = "model_shapes.json"
OPTIMIZER_FILE = "optimizer.pt"


class RevisionLayout(Protocol):
    def write(self, weights: dict[str, torch.Tensor], folder: Path, shard_bytes: int | None = None) -> list[str]:
        """Write the model files of one revision into ``folder`` (tied weights already
        removed from ``weights``); return the names of the files written. Weights of more
        than ``shard_bytes`` in all go into shards with an index (``write_weights``); None
        keeps them in one file whatever their size."""

    def describe(self, shapes: dict[str, list[int]], folder: Path) -> list[str]:
        """Write the files that describe the model without its weights; return their names."""


class WeightsLayout:
    """Weights alone, as ``model.safetensors`` (or its shards and index)."""

    def write(self, weights: dict[str, torch.Tensor], folder: Path, shard_bytes: int | None = None) -> list[str]:
        return write_weights(weights, folder, shard_bytes)

    def describe(self, shapes: dict[str, list[int]], folder: Path) -> list[str]:
        atomic.write_bytes(folder / SHAPES_FILE, (json.dumps(shapes, indent=1) + "\n").encode())
        return [SHAPES_FILE]


def write_weights(weights: dict[str, torch.Tensor], folder: Path, shard_bytes: int | None = None) -> list[str]:
    """``model.safetensors``, or above ``shard_bytes`` its shards and index; the names written."""
    # "format: pt" is what transformers' loader checks before it reads a file.
    return tensor_files.write(weights, folder, MODEL_STEM, shard_bytes, metadata={"format": "pt"})
