"""A Llama-style causal language model trained on real text: the default job.

What subnet-38 miners train and validators load with ``from_pretrained``: a Llama of a
preset shape (or a local Hugging Face model to continue from), a byte-level BPE
trained on the corpus, the corpus tokenised once into a cache, held-out loss,
perplexity and bits per byte, and uploads in the Hugging Face layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from daemon.config import Config, ConfigError, problem
from daemon.tasks.causal_lm import corpus
from daemon.tasks.causal_lm.presets import max_positions, model_dir_problem
from daemon.tasks.entry import TaskEntry

if TYPE_CHECKING:
    import torch
    from torch import nn

    from daemon.training.task import BuildContext, TaskParts

# Retrieval-only features: what each one is, for the error line.
RETRIEVAL_ONLY = {
    "mining.enabled": "hard-negative mining",
    "embeddings.enabled": "per-document ID embeddings",
}


def validate(cfg: Config, world_size: int) -> list[str]:
    """Checks that read the file system only: paths, model directories, positions."""
    lm = cfg.lm
    problems = []
    for key, feature in RETRIEVAL_ONLY.items():
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name):
            problems.append(problem(key, f"{feature} needs train.task=twotower", cfg.train.task))
    if lm.init_from and (why := model_dir_problem(lm.init_from)):
        problems.append(problem("lm.init_from", why, lm.init_from))
    if lm.tokenizer and not Path(lm.tokenizer).expanduser().exists():
        problems.append(problem("lm.tokenizer", "no such file or directory", lm.tokenizer))
    positions = max_positions(lm) if not problems else None
    if positions is not None and lm.seq_len > positions:
        origin = "lm.init_from's config" if lm.init_from else f"lm.preset={lm.preset}"
        problems.append(problem("lm.seq_len", f"is over the model's {positions} positions ({origin})", lm.seq_len))
    try:
        corpus.discover(lm.corpus)
    except ConfigError as exc:
        problems.extend(exc.problems)
    return problems


def build(ctx: BuildContext) -> TaskParts:
    from daemon.tasks.causal_lm.build import build as build_lm

    return build_lm(ctx)


def diagnose_model(cfg: Config, device: torch.device) -> nn.Module:
    from daemon.tasks.causal_lm.model import build_model

    vocab = cfg.lm.vocab_size
    if cfg.lm.tokenizer:
        from daemon.tasks.causal_lm.tokenizer import load_or_train

        vocab = len(load_or_train(cfg.lm, [], cfg.state_dir / "lm"))
    elif cfg.lm.init_from:
        vocab = 0  # the model's own vocabulary
    return build_model(cfg.lm, vocab, None, device)


ENTRY = TaskEntry(
    name="causal_lm",
    summary="a Llama-style causal language model on real text (the Python standard library by default)",
    build=build,
    diagnose_model=diagnose_model,
    # One micro-batch is 16 sequences of lm.seq_len tokens (4,096 tokens at 256): about a
    # second per inner step for the tiny preset on two CPU cores. The contract's 256 is
    # the two-tower task's 256 documents. GPUs: raise both (see README).
    defaults={
        "train.batch_size": 16,
        "train.effective_batch_size": 16,
        "train.lr": 3e-3,
        "train.warmup_steps": 50,
    },
    validate=validate,
)
