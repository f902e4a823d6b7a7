"""Model shapes by name, and the positions a configured model can attend over.

Plain data, no model library: ``minerd config validate`` checks ``lm.seq_len``
against them without importing transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from daemon.tasks.causal_lm.config import LmConfig

# Llama shapes (LlamaConfig keywords). The vocabulary comes from the tokenizer; the
# input embedding and the output layer are tied, as in Llama-3.2-1B.
PRESETS: dict[str, dict[str, Any]] = {
    # About 5M parameters at a vocabulary of 8192: the CPU default.
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024},
    # About 40M parameters at a vocabulary of 8192: a small GPU or a patient CPU.
    "small": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 10,
              "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 2048},
    # The shape subnet-38 miners train (about 1B parameters at a vocabulary of 8192).
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 2048},
}

MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def model_dir_problem(path: str) -> str | None:
    """Why ``path`` is not a Hugging Face model directory, or None when it is one."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return "not a directory"
    if not (p / "config.json").is_file():
        return "not a Hugging Face model directory (no config.json)"
    if not any((p / name).is_file() for name in MODEL_WEIGHTS):
        return "has no weights (model.safetensors or pytorch_model.bin)"
    try:
        json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"config.json is not readable JSON ({exc})"
    return None


def max_positions(lm: LmConfig) -> int | None:
    """Positions the configured model supports; None when its config does not say."""
    if lm.init_from:
        try:
            config = json.loads((Path(lm.init_from).expanduser() / "config.json").read_text())
        except (OSError, ValueError):
            return None
        value = config.get("max_position_embeddings") if isinstance(config, dict) else None
        return value if isinstance(value, int) else None
    return int(PRESETS[lm.preset]["max_position_embeddings"])
