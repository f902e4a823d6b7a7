"""The language model's config section (``lm``), declared by its task."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from daemon.config import Section


class LmConfig(Section):
    """The causal language-model task (``train.task=causal_lm``)."""

    key = "lm"
    agreed = "all"

    preset: Literal["tiny", "small", "llama-1b"] = Field("tiny", description="model shape (ignored with init_from)")
    init_from: str = Field("", description="a local Hugging Face model directory to continue from")
    tokenizer: str = Field("", description="tokenizer.json or a tokenizer directory; empty = BPE trained on the corpus")
    vocab_size: int = Field(8192, ge=512, le=1_048_576, description="size of the BPE trained on the corpus")
    corpus: list[str] = Field(
        default_factory=list,
        description="files, directories or globs (.txt .md .py .jsonl .parquet); empty = the standard library",
    )
    seq_len: int = Field(256, ge=8, description="tokens per training sequence")
    eval_fraction: float = Field(0.01, gt=0, lt=1, description="share of documents held out, chosen by path hash")
    eval_every_steps: int = Field(200, gt=0, description="inner steps between held-out evaluations")
    eval_sequences: int = Field(64, gt=0, description="held-out sequences evaluated each time")

    @field_validator("corpus", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        # `--set lm.corpus=docs/` and MINERD_LM__CORPUS=docs/ name one entry.
        if isinstance(value, str):
            return [value] if value else []
        return [] if value is None else value
