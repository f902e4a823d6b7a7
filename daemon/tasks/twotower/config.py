"""The retrieval task's config sections: ``twotower`` (the towers and the corpus),
``mining`` and ``embeddings`` (the operators' names for its two features)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from daemon.config import SEED_MAX, CrossFieldError, Entries, Section


class TwoTowerConfig(Section):
    """The two-tower model and the corpus it trains on (``train.task=twotower``)."""

    key = "twotower"
    agreed = "all"

    corpus: Literal["code", "pairs", "synthetic"] = Field(
        "code", description="code: (docstring, function) pairs of this machine's Python sources; pairs: "
        "twotower.pairs; synthetic: the generated corpus (num_docs, dim, cluster_size, seed)")
    pairs: Entries = Field(default_factory=list, description="files, directories or globs of .jsonl or .parquet "
                             "with query, document, optional negatives and group (twotower.corpus=pairs)")
    code_paths: Entries = Field(default_factory=list, description="directories of Python sources for "
                                "twotower.corpus=code (empty = this interpreter's standard library and packages)")
    init_from: str = Field("", description="a local Hugging Face encoder or causal-LM directory whose mean-pooled "
                           "hidden states start both towers (its tokenizer replaces the BPE)")
    vocab_size: int = Field(8192, ge=256, le=1_048_576, description="size of the BPE trained on a text corpus's "
                            "training pairs")
    eval_fraction: float = Field(0.05, gt=0, lt=1, description="share of a text corpus's pairs held out (by their "
                                 "group, else their document)")

    hidden_dim: int = Field(1024, gt=0, description="width of each tower's hidden layers")
    embed_dim: int = Field(128, gt=0, description="width of the embeddings both towers end in")
    temperature: float = Field(0.05, gt=0, le=10, description="of the InfoNCE loss")
    num_docs: int = Field(200_000, ge=16, description="documents in the generated corpus")
    eval_queries: int = Field(2000, ge=1, description="held-out queries of the generated corpus")
    dim: int = Field(128, gt=0, description="input feature width of the generated corpus")
    cluster_size: int = Field(16, ge=1, description="near-duplicate documents per cluster")
    seed: int = Field(7, ge=0, le=SEED_MAX, description="the generated corpus's seed")


# Where the keys of the two-tower section lived before it existed; read for one release.
RENAMED = {
    "train.hidden_dim": "twotower.hidden_dim",
    "train.embed_dim": "twotower.embed_dim",
    "train.temperature": "twotower.temperature",
    **{f"data.{key}": f"twotower.{key}" for key in ("num_docs", "eval_queries", "dim", "cluster_size", "seed")},
}


class MiningConfig(Section):
    key = "mining"
    feature = "hard-negative mining"

    enabled: bool = Field(False, description="hard-negative mining (twotower only; on by default there)")
    start_epoch: int = Field(6, ge=0)
    qbatch: int = Field(2048, gt=0)
    ttl: int = Field(5, ge=1)
    prefetch: int = Field(3, ge=1)
    num_negatives: int = Field(16, ge=1)
    hardneg_frac: float = Field(0.5, ge=0, le=1)
    cos_min: float = Field(0.84, ge=-1, le=1)
    cos_max: float = Field(0.96, ge=-1, le=1)
    max_pos_ratio: float = Field(
        0.95, ge=0, le=10, description="a mined candidate scoring above this times the query's positive score is "
        "dropped as a likely false negative (0 = off)")
    refresh_steps: int = Field(3000, gt=0)
    fifo_max: int = Field(8, gt=0)
    index: Literal["flat", "ivf", "hnsw"] = "flat"
    faiss_threads: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _window(self) -> MiningConfig:
        if self.cos_min >= self.cos_max:
            raise CrossFieldError("cos_min", f"must be below mining.cos_max ({self.cos_max})", self.cos_min)
        return self


class EmbeddingsConfig(Section):
    key = "embeddings"
    feature = "per-document ID embeddings"
    # Replicas with and without the ID embeddings train different models.
    agreed = frozenset({"enabled"})

    enabled: bool = Field(
        False, description="trainable per-document ID embeddings (twotower only; on by default there)"
    )
    storage_mode: Literal["memory", "disk"] = "memory"
    dir: str = Field("", description="empty = <paths.state_dir>/embeddings")
    chunk_size: int = Field(1024, gt=0)
    cache_l1_mb: float = Field(256, ge=0)
    cache_l2_mb: float = Field(512, ge=0)
    enable_l3: bool = True
    sync_batch_size: int = Field(10, gt=0)
    auto_sync: bool = True
