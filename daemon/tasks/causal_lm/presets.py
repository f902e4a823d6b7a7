"""Model shapes by name, and the positions a configured model can attend over.

Plain data, no model library: ``minerd config validate`` checks ``lm.seq_len``
against them without importing transformers.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from daemon.tasks.causal_lm.config import LmConfig

# Llama shapes (LlamaConfig keywords). The vocabulary comes from the tokenizer; the
# input embedding and the output layer are tied, as in Llama-3.2-1B, unless a shape says not.
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
    # Llama-3.2-3B's shape (about 3.2B parameters at Llama-3's vocabulary of 128,256): sharded
    # over several GPUs (train.sharding=fsdp).
    "llama-3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                 "num_attention_heads": 24, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                 "rope_theta": 500000.0},
    # Llama-3.1-8B's shape (about 8.0B parameters at a vocabulary of 128,256; as in the original,
    # its output layer is its own matrix, not the input embedding's).
    "llama-8b": {"tie_word_embeddings": False, "hidden_size": 4096, "intermediate_size": 14336,
                 "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                 "rope_theta": 500000.0},
}

MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
# A model's config.json and tokenizer_config.json are KBs (a long chat template makes the
# latter tens of KB); anything near this is not one of them.
MAX_CONFIG_BYTES = 16 << 20
# The files transformers reads an ``auto_map`` (the model's own Python code) from.
CODE_MAPS = ("config.json", "tokenizer_config.json")


def model_dir_problem(path: str) -> str | None:
    """Why ``path`` is not a Hugging Face model directory minerd may load, or None when it is one.

    A directory that brings its own Python code is refused: transformers would ask on the
    terminal whether to run it (and a ``y`` would), so minerd never lets it get that far,
    and loads with ``trust_remote_code=False`` as well."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return "not a directory"
    if not (p / "config.json").is_file():
        return "not a Hugging Face model directory (no config.json)"
    if not any((p / name).is_file() for name in MODEL_WEIGHTS):
        return "has no weights (model.safetensors or pytorch_model.bin)"
    code = sorted(f.name for f in p.iterdir() if f.suffix == ".py")
    if code:
        return f"holds Python code ({code[0]}); a model's own code is never run"
    for name in CODE_MAPS:
        if not (p / name).exists():
            continue
        config = _read_json(p / name)
        if isinstance(config, str):
            return f"{name} {config}"
        if not isinstance(config, dict):
            return f"{name} is not a JSON object"
        if "auto_map" in config:
            return f"{name} names the model's own Python code (auto_map); it is never run"
    return None


def _read_json(path: Path) -> Any:
    """The parsed file, or why not ("is not readable JSON (...)"). Bounded before it is read
    (a regular file of at most MAX_CONFIG_BYTES: the operator's directory may link its files
    into a cache, as the Hugging Face hub's does, but not to a device); json's own recursion
    limit on a deeply nested file is a finding too, not a traceback."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CONFIG_BYTES:
            return f"is not a regular file of at most {MAX_CONFIG_BYTES} bytes"
        with open(path, "rb") as fh:
            return json.loads(fh.read(MAX_CONFIG_BYTES + 1))
    except RecursionError:
        return "is not readable JSON (nested too deep)"
    except (OSError, ValueError) as exc:
        return f"is not readable JSON ({exc})"


def max_positions(lm: LmConfig) -> int | None:
    """Positions the configured model supports; None when its config does not say."""
    if lm.init_from:
        config = _read_json(Path(lm.init_from).expanduser() / "config.json")
        value = config.get("max_position_embeddings") if isinstance(config, dict) else None
        return value if isinstance(value, int) else None
    return int(PRESETS[lm.preset]["max_position_embeddings"])
