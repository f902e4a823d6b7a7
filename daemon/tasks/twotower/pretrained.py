"""Towers that start from a pretrained model: ``twotower.init_from`` names a local Hugging
Face directory, an encoder (BERT-like) or a causal language model (a revision the
``causal_lm`` task published qualifies), and each tower is that model's base (the
language-model head, if any, left out) followed by a mean over the tokens' last hidden
states and a linear map to ``twotower.embed_dim``.

The map is the identity when the widths agree, and otherwise a random Gaussian
projection scaled by 1/sqrt(embed_dim), the same in both towers: it keeps cosines close
to the model's own, so the towers start where the model is, not from noise. The two
towers are separate copies (a query and a document are different kinds of text) and
train apart.

The corpus's token ids are the directory's tokenizer's ids plus one (0 pads): they are
shifted back here, and padding is masked out of both the attention and the mean.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from daemon.config import ConfigError, problem

KEY = "twotower.init_from"


class PretrainedTower(nn.Module):
    def __init__(self, encoder: nn.Module, hidden: int, out_dim: int, seed: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.proj = nn.Linear(hidden, out_dim, bias=False)
        with torch.no_grad():
            if hidden == out_dim:
                self.proj.weight.copy_(torch.eye(out_dim))
            else:
                gen = torch.Generator().manual_seed(seed)
                self.proj.weight.copy_(torch.randn(out_dim, hidden, generator=gen) / out_dim**0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids > 0
        # Padding is at the end of every row: columns no row uses are cut before the model.
        width = max(1, int(mask.sum(dim=1).max()))
        ids, mask = ids[:, :width], mask[:, :width]
        hidden = self.encoder(input_ids=(ids - 1).clamp(min=0), attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.proj(pooled)


def load_encoder(path: str, device: torch.device | None = None) -> tuple[nn.Module, int]:
    """The base model of ``path`` (weights read) and its hidden width; one config line when
    it does not load. On the meta device, shapes only, from its config.json."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the start-up is log lines, not a loading bar on stderr
    folder = str(Path(path).expanduser())
    try:
        # Never the directory's own code: init_from_problems refused a directory that has
        # some, and transformers must not offer to run it either.
        if device is not None and device.type == "meta":
            config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
            model = AutoModel.from_config(config, trust_remote_code=False)
        else:
            model = AutoModel.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                              dtype=torch.float32, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # one config line, not a page
        raise ConfigError([problem(KEY, f"cannot load the model: {why}", path)]) from None
    if getattr(model, "pooler", None) is not None:
        # An encoder's pooler (BERT's [CLS] layer) is not part of a mean-pooled tower: left in,
        # its weights would get no gradient, which DDP refuses.
        model.pooler = None
    hidden = getattr(model.config, "hidden_size", None)
    if not isinstance(hidden, int) or hidden <= 0:
        raise ConfigError([problem(KEY, "its config.json gives no hidden_size to pool", path)])
    return model, hidden


def pretrained_towers(path: str, out_dim: int, seed: int, device: torch.device | None = None
                      ) -> tuple[PretrainedTower, PretrainedTower]:
    encoder, hidden = load_encoder(path, device)
    query = PretrainedTower(encoder, hidden, out_dim, seed)
    return query, PretrainedTower(copy.deepcopy(encoder), hidden, out_dim, seed)
