"""How a revision's model files are laid out: the task decides, the publisher writes.

The two-tower task publishes its weights as ``model.safetensors``; the language
model publishes the Hugging Face layout validators load with ``from_pretrained``
(``daemon/tasks/causal_lm/export.py``). Either way the publisher hashes every file
into the manifest and writes the manifest, then ``LATEST``, last.

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

from daemon import atomic
from daemon.disk import save_safetensors

MODEL_FILE = "model.safetensors"
SHAPES_FILE = "model_shapes.json"
OPTIMIZER_FILE = "optimizer.pt"


class RevisionLayout(Protocol):
    def write(self, weights: dict[str, torch.Tensor], folder: Path) -> list[str]:
        """Write the model files of one revision into ``folder`` (tied weights already
        removed from ``weights``); return the names of the files written."""

    def describe(self, shapes: dict[str, list[int]], folder: Path) -> list[str]:
        """Write the files that describe the model without its weights; return their names."""


class WeightsLayout:
    """Weights alone, as ``model.safetensors``."""

    def write(self, weights: dict[str, torch.Tensor], folder: Path) -> list[str]:
        write_safetensors(weights, folder / MODEL_FILE)
        return [MODEL_FILE]

    def describe(self, shapes: dict[str, list[int]], folder: Path) -> list[str]:
        atomic.write_bytes(folder / SHAPES_FILE, (json.dumps(shapes, indent=1) + "\n").encode())
        return [SHAPES_FILE]


def write_safetensors(weights: dict[str, torch.Tensor], path: Path) -> None:
    # "format: pt" is what transformers' loader checks before it reads a file.
    atomic.write_with(path, lambda tmp: save_safetensors(weights, tmp, metadata={"format": "pt"}))
