"""Upload revisions in the Hugging Face layout subnet-38 miners push and validators load.

``config.json``, ``generation_config.json``, the weights as ``save_pretrained`` writes them
(tied weights once; ``model.safetensors``, or above ``upload.shard_bytes`` numbered shards
and ``model.safetensors.index.json``) and the tokenizer's files: a directory that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load
offline. The config and tokenizer files are rendered once, when the run is built;
each revision writes them beside its weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from daemon import atomic
from daemon.upload.layout import write_weights


class HfLayout:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files  # name -> bytes of every file but the weights

    @classmethod
    def of(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> HfLayout:
        files = {
            "config.json": model.config.to_json_string(use_diff=False).encode(),
            "generation_config.json": GenerationConfig.from_model_config(model.config).to_json_string().encode(),
        }
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            for path in sorted(Path(tmp).iterdir()):
                if path.is_file():
                    files[path.name] = path.read_bytes()
        return cls(files)

    def write(self, weights: dict[str, torch.Tensor], folder: Path, shard_bytes: int | None = None) -> list[str]:
        return [*write_weights(weights, folder, shard_bytes), *self.describe({}, folder)]

    def describe(self, shapes: dict[str, list[int]], folder: Path) -> list[str]:
        """The config and tokenizer files: ``config.json`` says every shape."""
        for name, data in self.files.items():
            atomic.write_bytes(folder / name, data)
        return list(self.files)
