"""A Llama-style causal language model trained on real text: the default job.

What subnet-38 miners train and validators load with ``from_pretrained``: a Llama of a
preset shape (or a local Hugging Face model to continue from), a byte-level BPE
trained on the corpus, the corpus tokenised once into a cache (the text data source),
held-out loss, perplexity and bits per byte, and uploads in the Hugging Face layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import daemon.data.text.vocab as vocab
from daemon.config import Config, problem
from daemon.data.text.spec import TextSpec
from daemon.model_dir import model_dir_problem
from daemon.plugin.entries import DataRequest, TaskEntry
from daemon.tasks.causal_lm.config import LmConfig
from daemon.tasks.causal_lm.presets import max_positions

if TYPE_CHECKING:
    import torch
    from torch import nn

    from daemon.plugin.parts import BuildContext, TaskParts


def text_spec(lm: LmConfig) -> TextSpec:
    # A model continued from has its embedding rows in its config; a preset's are decided
    # from the tokenizer (daemon/tasks/causal_lm/build.py).
    rows = vocab.model_rows(lm.init_from) if lm.init_from else None
    return TextSpec("lm", tuple(lm.corpus), lm.tokenizer, lm.init_from, lm.vocab_size, lm.eval_fraction, rows,
                    lm.dataset, lm.cache_dir, lm.cache_bytes)


def data(cfg: Config) -> DataRequest:
    return DataRequest("text", text_spec(LmConfig.of(cfg)))


def validate(cfg: Config, world_size: int) -> list[str]:
    """Checks that read the file system only: model directories, tokenizer, positions."""
    lm = LmConfig.of(cfg)
    problems = []
    if lm.init_from and (why := model_dir_problem(lm.init_from)):
        problems.append(problem("lm.init_from", why, lm.init_from))
    if lm.tokenizer and (why := vocab.named_problem(lm.tokenizer)):
        problems.append(problem("lm.tokenizer", why, lm.tokenizer))
    if not problems:
        problems += _token_id_problems(lm)
    positions = max_positions(lm) if not problems else None
    if positions is not None and lm.seq_len > positions:
        origin = "lm.init_from's config" if lm.init_from else f"lm.preset={lm.preset}"
        problems.append(problem("lm.seq_len", f"is over the model's {positions} positions ({origin})", lm.seq_len))
    return problems


def _token_id_problems(lm: LmConfig) -> list[str]:
    """A named tokenizer that can produce an id the model has no embedding row for, where
    both are known without building the model: the ids of a tokenizer.json against the
    vocab_size of lm.init_from's config.json, or against the tokenizer's own length for a
    preset (sized from it). A preset fed a tokenizer directory is checked when it is
    loaded (transformers may add tokens from the directory's other files)."""
    if not lm.tokenizer:  # the tokenizer of the model's directory, if any
        why = vocab.model_tokenizer_problem(lm.init_from, "lm.init_from") if lm.init_from else None
        return [problem("lm.init_from", why, lm.init_from)] if why else []
    key, path = "lm.tokenizer", lm.tokenizer
    try:
        ids = vocab.file_ids(path)
    except ValueError as exc:
        return [problem(key, f"cannot load a tokenizer from it: {str(exc)[:200]}", path)]
    if ids is None:
        return []
    largest, count = ids
    rows = vocab.model_rows(lm.init_from) if lm.init_from else None
    if rows is not None:
        why = vocab.ids_problem(largest, rows, "the vocab_size of lm.init_from's config.json")
    elif not lm.init_from and Path(path).expanduser().is_file():
        why = vocab.ids_problem(largest, count, f"one per token of the tokenizer, which has {count}")
    else:
        why = None
    return [problem(key, why, path)] if why else []


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
        if device.type == "meta":  # shapes only: from its config.json, its weights never read
            from pathlib import Path

            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(str(Path(lm.init_from).expanduser()), local_files_only=True,
                                                trust_remote_code=False)
            with device:
                return cast("nn.Module", AutoModelForCausalLM.from_config(config, trust_remote_code=False))
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
    shards=True,
)
