"""Model shapes by name, and the positions a configured model can attend over.

Plain data, no model library: ``minerd config validate`` checks ``lm.seq_len``
against them without importing transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.model_dir import read_json
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

def max_positions(lm: LmConfig) -> int | None:
    """Positions the configured model supports; None when its config does not say."""
    if lm.init_from:
        config = read_json(Path(lm.init_from).expanduser() / "config.json")
        value = config.get("max_position_embeddings") if isinstance(config, dict) else None
        return value if isinstance(value, int) else None
    return int(PRESETS[lm.preset]["max_position_embeddings"])
