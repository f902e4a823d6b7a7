"""Two-tower retrieval on real (query, document) pairs or a generated corpus, with asynchronous FAISS hard-negative
mining (``mining/``) and trainable per-document ID embeddings in a tiered store
(``embeddings/``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import daemon.data.text.vocab as vocab
from daemon.config import Config, problem
from daemon.data.generated.spec import GeneratedSpec
from daemon.data.pairs.spec import PairsSpec
from daemon.model_dir import model_dir_problem
from daemon.plugin.entries import DataRequest, TaskEntry
from daemon.tasks.twotower.config import RENAMED, EmbeddingsConfig, MiningConfig, TwoTowerConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from daemon.plugin.parts import BuildContext, TaskParts


def data(cfg: Config) -> DataRequest:
    t = TwoTowerConfig.of(cfg)
    if t.corpus == "synthetic":
        return DataRequest("generated", GeneratedSpec(t.num_docs, t.eval_queries, t.dim, t.cluster_size, t.seed))
    return DataRequest("pairs", PairsSpec(t.corpus, tuple(t.pairs), t.vocab_size, t.eval_fraction, t.eval_queries,
                                          t.init_from, tuple(t.code_paths)))


def validate(cfg: Config, world_size: int) -> list[str]:
    problems = []
    t = TwoTowerConfig.of(cfg)
    if t.pairs and t.corpus != "pairs":
        problems.append(problem("twotower.pairs", f"is read with twotower.corpus=pairs (got '{t.corpus}')", t.pairs))
    if t.code_paths and t.corpus != "code":
        problems.append(problem("twotower.code_paths", f"is read with twotower.corpus=code (got '{t.corpus}')",
                                t.code_paths))
    for path in t.code_paths:
        if not Path(path).expanduser().is_dir():
            problems.append(problem("twotower.code_paths", "not a directory", path))
    if t.init_from:
        if t.corpus == "synthetic":
            problems.append(problem("twotower.init_from", "needs a text corpus (twotower.corpus=code or pairs), "
                                    "not the generated one", t.init_from))
        elif why := (model_dir_problem(t.init_from)
                     or vocab.model_tokenizer_problem(t.init_from, "twotower.init_from")):
            problems.append(problem("twotower.init_from", why, t.init_from))
    docs = t.num_docs
    if t.corpus == "synthetic" and cfg.train.batch_size > docs:
        problems.append(problem("train.batch_size", f"is larger than twotower.num_docs ({docs})", cfg.train.batch_size))
    emb = EmbeddingsConfig.of(cfg)
    if world_size > 1 and emb.enabled and emb.storage_mode == "disk":
        problems.append(
            problem("embeddings.storage_mode", "disk mode is single-process (chunk files have one writer); "
                     "use memory under torchrun", "disk")
        )
    return problems


def threads(cfg: Config) -> int:
    """The FAISS miner's threads, when mining is on: they share the cores with torch's."""
    mining = MiningConfig.of(cfg)
    return mining.faiss_threads if mining.enabled else 0


def build(ctx: BuildContext, corpus: Any) -> TaskParts:
    from daemon.tasks.twotower.build import build as build_twotower

    return build_twotower(ctx, corpus)


def diagnose_model(cfg: Config, device: torch.device) -> nn.Module:
    from daemon.tasks.twotower.task import build_model

    with device:  # the meta device too: shapes only
        return build_model(cfg)


ENTRY = TaskEntry(
    name="twotower",
    summary="two-tower retrieval (code search, your own pairs, or a generated corpus), with FAISS hard-negative "
            "mining",
    sections=(TwoTowerConfig, MiningConfig, EmbeddingsConfig),
    # The retrieval features are this task's reason to exist: on unless turned off.
    defaults={"mining.enabled": True, "embeddings.enabled": True},
    renamed=RENAMED,
    validate=validate,
    data=data,
    threads=threads,
    build=build,
    diagnose_model=diagnose_model,
)
