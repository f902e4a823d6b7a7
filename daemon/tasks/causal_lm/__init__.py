"""A Llama-style causal language model trained on real text: the default job.

What subnet-38 miners train and validators load with ``from_pretrained``: a Llama of a
preset shape (or a local Hugging Face model to continue from), a byte-level BPE
trained on the corpus, the corpus tokenised once into a cache (the text data source),
held-out loss, perplexity and bits per byte, and uploads in the Hugging Face layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.config import Config, problem
from daemon.data.text.spec import TextSpec
from daemon.plugin.entries import DataRequest, TaskEntry
from daemon.tasks.causal_lm.config import LmConfig
from daemon.tasks.causal_lm.presets import max_positions, model_dir_problem

if TYPE_CHECKING:
    import torch
    from torch import nn

    from daemon.plugin.parts import BuildContext, TaskParts


def text_spec(lm: LmConfig) -> TextSpec:
    return TextSpec("lm", tuple(lm.corpus), lm.tokenizer, lm.init_from, lm.vocab_size, lm.eval_fraction)


def data(cfg: Config) -> DataRequest:
    return DataRequest("text", text_spec(LmConfig.of(cfg)))


def validate(cfg: Config, world_size: int) -> list[str]:
    """Checks that read the file system only: model directories, tokenizer, positions."""
    lm = LmConfig.of(cfg)
    problems = []
    if lm.init_from and (why := model_dir_problem(lm.init_from)):
        problems.append(problem("lm.init_from", why, lm.init_from))
    if lm.tokenizer and not Path(lm.tokenizer).expanduser().exists():
        problems.append(problem("lm.tokenizer", "no such file or directory", lm.tokenizer))
    positions = max_positions(lm) if not problems else None
    if positions is not None and lm.seq_len > positions:
        origin = "lm.init_from's config" if lm.init_from else f"lm.preset={lm.preset}"
        problems.append(problem("lm.seq_len", f"is over the model's {positions} positions ({origin})", lm.seq_len))
    return problems


def build(ctx: BuildContext, text: Any) -> TaskParts:
    from daemon.tasks.causal_lm.build import build as build_lm

    return build_lm(ctx, text)


def diagnose_model(cfg: Config, device: torch.device) -> nn.Module:
    from daemon.tasks.causal_lm.model import build_model

    lm = LmConfig.of(cfg)
    vocab = lm.vocab_size
    if lm.tokenizer:
        from daemon.data.text.tokenizer import load_or_train

        vocab = len(load_or_train(text_spec(lm), [], cfg.state_dir / "lm"))
    elif lm.init_from:
        vocab = 0  # the model's own vocabulary
    return build_model(lm, vocab, None, device)


ENTRY = TaskEntry(
    name="causal_lm",
    summary="a Llama-style causal language model on real text (the Python standard library by default)",
    sections=(LmConfig,),
    # One micro-batch is 16 sequences of lm.seq_len tokens (4,096 tokens at 256): about a
    # second per inner step for the tiny preset on two CPU cores. The 256 of the core's
    # defaults are the two-tower task's 256 documents. GPUs: raise both (see README).
    defaults={
        "train.batch_size": 16,
        "train.effective_batch_size": 16,
        "train.lr": 3e-3,
        "train.warmup_steps": 50,
    },
    validate=validate,
    data=data,
    build=build,
    diagnose_model=diagnose_model,
)
