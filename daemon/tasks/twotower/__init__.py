"""Two-tower retrieval on a generated corpus, with asynchronous FAISS hard-negative
mining and trainable per-document ID embeddings in a tiered store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.config import Config, problem
from daemon.tasks.entry import TaskEntry

if TYPE_CHECKING:
    import torch
    from torch import nn

    from daemon.training.task import BuildContext, TaskParts


def validate(cfg: Config, world_size: int) -> list[str]:
    problems = []
    if cfg.train.batch_size > cfg.data.num_docs:
        problems.append(
            problem("train.batch_size", f"is larger than data.num_docs ({cfg.data.num_docs})", cfg.train.batch_size)
        )
    if world_size > 1 and cfg.embeddings.enabled and cfg.embeddings.storage_mode == "disk":
        problems.append(
            problem("embeddings.storage_mode", "disk mode is single-process (chunk files have one writer); "
                     "use memory under torchrun", "disk")
        )
    return problems


def build(ctx: BuildContext) -> TaskParts:
    from daemon.tasks.twotower.build import build as build_twotower

    return build_twotower(ctx)


def diagnose_model(cfg: Config, device: torch.device) -> nn.Module:
    from daemon.tasks.twotower.task import build_model

    return build_model(cfg).to(device)


ENTRY = TaskEntry(
    name="twotower",
    summary="two-tower retrieval on a generated corpus, with FAISS hard-negative mining",
    build=build,
    diagnose_model=diagnose_model,
    # The retrieval features are this task's reason to exist: on unless turned off.
    defaults={"mining.enabled": True, "embeddings.enabled": True},
    validate=validate,
)
