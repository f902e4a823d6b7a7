"""What model a revision's ``config.json`` describes, found before any of it is allocated.

``from_pretrained`` allocates whatever the config asks for and only then reads the weights:
a 200-byte config with a vocabulary of a million and a hidden size of 4096 asks for 16 GB,
one with 20,000 layers spends half a minute and a GB building Python objects. So the config
is read with a size cap, its layer and expert counts are bounded, and the model is built on
the meta device (shapes without memory) to count its parameters; a revision with weights
must hold exactly that many (``hf_check``), one without may describe at most
``Limits.params``.

A config that names custom code (``auto_map``) is refused: code from an upload is never run,
and every transformers call here passes ``trust_remote_code=False`` as well.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.upload.limits import LIMITS, Limits, Refused, first_line, read_json

HF_CONFIG = "config.json"
# The keys configs of transformers' models give their layer counts under.
LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers")


@dataclass(frozen=True)
class ModelSize:
    params: dict[str, list[int]]  # name -> shape of each parameter, tied ones once
    buffer_elements: int  # persistent buffers, which save_pretrained writes beside the parameters

    @property
    def param_elements(self) -> int:
        return sum(math.prod(shape) for shape in self.params.values())


def read_config(folder: Path, limits: Limits = LIMITS) -> dict[str, Any] | str:
    """``folder/config.json`` as a mapping, or why it is refused."""
    try:
        config = read_json(folder / HF_CONFIG, limits.config_bytes, limits.json_depth)
    except Refused as exc:
        return str(exc)
    if not isinstance(config, dict):
        return "not a JSON object"
    return config_problem(config, limits) or config


def config_problem(config: dict[str, Any], limits: Limits = LIMITS) -> str | None:
    """Why a parsed config is refused before anything is built from it, or None."""
    if "auto_map" in config:
        return "names custom code (auto_map); code from an upload is never run"
    for key, value in _items(config):
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if key in LAYER_KEYS and value > limits.layers:
            return f"{key} {value} is over the {limits.layers} layers a model may have here"
        if "expert" in key and value > limits.experts:
            return f"{key} {value} is over the {limits.experts} experts a model may have here"
    return None


def _items(config: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Every key and value, nested configs too (a multimodal model's text_config)."""
    todo = [config]
    while todo:
        node = todo.pop()
        for key, value in node.items():
            if isinstance(value, dict):
                todo.append(value)
            yield str(key), value


def model_size(folder: Path) -> ModelSize | str:
    """The parameters of the model ``folder/config.json`` describes, built on the meta device,
    or why it cannot be built. ``read_config`` must have accepted the config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as exc:  # whatever the library raises, the config is the finding
        return f"cannot build the model: {first_line(exc)}"
    params = {name: list(p.shape) for name, p in model.named_parameters()}
    buffers = sum(buf.numel() for module in model.modules() for name, buf in module.named_buffers(recurse=False)
                  if name not in module._non_persistent_buffers_set)
    return ModelSize(params, buffers)
