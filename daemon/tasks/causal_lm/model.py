"""The language model: a randomly initialised Llama of a preset shape, or a local
Hugging Face model to continue from. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from daemon.config import ConfigError, problem
from daemon.tasks.causal_lm.config import LmConfig
from daemon.tasks.causal_lm.presets import PRESETS


def llama_config(preset: str, vocab_size: int, eos_id: int | None) -> LlamaConfig:
    shape: dict[str, Any] = {
        "tie_word_embeddings": True,
        **PRESETS[preset],
        # PyTorch's scaled_dot_product_attention: flash/memory-efficient kernels on CUDA.
        "attn_implementation": "sdpa",
    }
    return LlamaConfig(
        vocab_size=vocab_size, bos_token_id=None, eos_token_id=eos_id, pad_token_id=eos_id,
        **shape,
    )


def input_embedding(model: PreTrainedModel) -> nn.Embedding:
    return cast(nn.Embedding, model.get_input_embeddings())


def embedding_rows(model: PreTrainedModel) -> int:
    return input_embedding(model).num_embeddings


def build_model(lm: LmConfig, vocab_size: int, eos_id: int | None, device: torch.device) -> PreTrainedModel:
    """The model in float32 on ``device`` (AMP casts per operation; the master weights stay fp32)."""
    if lm.init_from:
        try:
            # Never the directory's own code: model_dir_problem refuses a directory that has
            # some, and transformers must not offer to run it either.
            model = AutoModelForCausalLM.from_pretrained(
                str(Path(lm.init_from).expanduser()), local_files_only=True, trust_remote_code=False,
                dtype=torch.float32, attn_implementation="sdpa",
            )
        except (OSError, ValueError) as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # one config line, not a page
            raise ConfigError([problem("lm.init_from", f"cannot load the model: {why}", lm.init_from)]) from None
        if embedding_rows(model) < vocab_size:
            raise ConfigError([problem(
                "lm.tokenizer", f"has {vocab_size} tokens, more than the model's {embedding_rows(model)} embeddings",
                lm.tokenizer or lm.init_from)])
        return cast(PreTrainedModel, nn.Module.to(model, device))
    with torch.device(device):  # initialised where it trains: no host copy of a large model
        return LlamaForCausalLM(llama_config(lm.preset, vocab_size, eos_id))


def unwrap(model: nn.Module) -> PreTrainedModel:
    inner = getattr(model, "module", model)
    assert isinstance(inner, PreTrainedModel)
    return inner


def flops_per_token(model: PreTrainedModel, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter that multiplies (forward and backward),
    plus attention's scores and weighted sum, 12 x layers x hidden x sequence length.

    The input embedding is a lookup, not a multiply: it counts only where the output
    layer shares it (then the matrix is multiplied once per token, at the output).
    """
    params = sum(p.numel() for p in model.parameters())
    embed = input_embedding(model).weight
    out = model.get_output_embeddings()
    tied = out is not None and getattr(out, "weight", None) is embed
    if not tied:
        params -= embed.numel()
    cfg = model.config
    layers, hidden = int(getattr(cfg, "num_hidden_layers")), int(getattr(cfg, "hidden_size"))  # noqa: B009
    return 6.0 * params + 12.0 * layers * hidden * seq_len
