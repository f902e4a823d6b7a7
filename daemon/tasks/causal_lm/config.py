"""The language model's config section (``lm``), declared by its task."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from daemon.config import Entries, Section


class LmConfig(Section):
    """The causal language-model task (``train.task=causal_lm``)."""

    key = "lm"
    agreed = "all"
    # Where this machine keeps its copy of the shards, how much, and which slice it trains.
    local = frozenset({"cache_dir", "cache_bytes", "prefetch_shards", "replica"})

    preset: Literal["tiny", "small", "llama-1b", "llama-3b", "llama-8b"] = Field(
        "tiny", description="model shape (ignored with init_from)")
    init_from: str = Field("", description="a local Hugging Face model directory to continue from")
    tokenizer: str = Field("", description="tokenizer.json or a tokenizer directory; empty = BPE trained on the corpus")
    vocab_size: int = Field(8192, ge=512, le=1_048_576, description="size of the BPE trained on the corpus")
    corpus: Entries = Field(
        default_factory=list,
        description="files, directories or globs (.txt .md .py .jsonl .parquet); empty = the standard library",
    )
    dataset: str = Field(
        "", description="a prepared dataset (a directory or s3://bucket/prefix, see `minerd data prepare`); "
        "empty = lm.corpus prepared into the state directory at the first start")
    cache_dir: str = Field("", description="where shards of an s3:// dataset are kept; empty = <state_dir>/data/cache")
    cache_bytes: int = Field(2 << 30, ge=1 << 12, description="most bytes the shard cache holds on disk")
    prefetch_shards: int = Field(1, ge=0, le=64, description="shards fetched ahead of the one being trained on")
    replica: int = Field(-1, ge=-1, le=1_000_000, description="which slice of the data this replica trains; "
                         "-1 = ft.replica_group under torchft, else 0")
    replicas: int = Field(0, ge=0, le=1_000_000, description="how many replicas split the data into disjoint "
                          "slices; 0 = each replica trains all of it, in its own order")
    seq_len: int = Field(256, ge=8, description="tokens per training sequence")
    eval_fraction: float = Field(0.01, gt=0, lt=1, description="share of documents held out, chosen by path hash")
    eval_every_steps: int = Field(200, gt=0, description="inner steps between held-out evaluations")
    eval_sequences: int = Field(64, gt=0, description="held-out sequences evaluated each time")
