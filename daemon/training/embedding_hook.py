"""Trainable per-document ID embeddings, read and updated through the tiered store.

Each document's tower output gets its own trainable row added before the
normalisation. Rows are read for the batch's documents only (one vectorised
gather from the store), receive gradients like any leaf tensor, and are
updated sparsely after the inner step by a row-wise Adam: only the rows of
the batch are touched, so ``embeddings.storage_mode=disk`` trains a table far
larger than the L1/L2 tiers. A skipped (non-finite) inner step updates no row.

The store and the row optimiser's moments are part of the checkpoint: the
memory table itself, or in disk mode the pinned generation of chunk files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog
import torch
from prometheus_client import CollectorRegistry

from daemon.embeddings import EmbeddingStore, SparseRowAdam
from daemon.state import MinerState

if TYPE_CHECKING:
    from daemon.training.engine import Trainer
    from daemon.training.twotower import TwoTowerTask

log = structlog.get_logger("minerd.train")

LOG_EVERY_EPOCHS = 5


class EmbeddingHook:
    name = "embeddings"

    def __init__(self, store: EmbeddingStore, lr: float, weight_decay: float = 0.0) -> None:
        self.store = store
        self.adam = SparseRowAdam(store, lr=lr, weight_decay=weight_decay)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._last_logged_epoch = 1

    # ---- the task's doc_extra --------------------------------------------
    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        cpu_ids = ids.detach().cpu()
        if not torch.is_grad_enabled():  # evaluation: read only
            return self.store.get_embeddings(cpu_ids).to(ids.device)
        leaf = self.store.get_embeddings(cpu_ids, requires_grad=True)
        self._pending.append((cpu_ids, leaf))
        return leaf.to(ids.device)

    # ---- StepHook ----------------------------------------------------------
    def before_inner_step(self, trainer: Trainer) -> None:
        self._pending.clear()  # rows read by a skipped step are not updated

    def after_inner_step(self, trainer: Trainer) -> None:
        self.adam.lr = trainer.p.optimizer.param_groups[0]["lr"]
        scale = trainer.scaler.get_scale() if trainer.scaler.is_enabled() else 1.0
        for ids, leaf in self._pending:
            if leaf.grad is None:
                continue
            if scale != 1.0:
                leaf.grad.div_(scale)
            self.adam.step(ids, leaf)
        self._pending.clear()
        epoch = trainer.c.epoch
        if epoch != self._last_logged_epoch and (epoch - 1) % LOG_EVERY_EPOCHS == 0:
            self._last_logged_epoch = epoch
            log.info(self.store.cache_log_line(), line=True, epoch=epoch - 1)

    # ---- Stateful ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"store": self.store.checkpoint_state(), "adam": self.adam.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.store.load_checkpoint_state(state["store"])
        self.adam.load_state_dict(state["adam"])

    # ---- Component -------------------------------------------------------------
    def start(self) -> None:
        return None

    def stop(self, timeout: float) -> None:
        self.store.close()  # writes the dirty chunks: a clean stop loses nothing


def attach_embeddings(
    trainer: Trainer, task: TwoTowerTask, registry: CollectorRegistry, state: MinerState, world_size: int
) -> EmbeddingHook | None:
    """Build the store and wire the ID embeddings into the task; None when off.

    Under torchrun the ID embeddings are off: ranks see different documents each
    epoch, so per-rank tables would disagree and a shared table would need a
    sparse all-reduce of every micro-batch's rows. One process owns the table.
    """
    cfg = trainer.cfg
    if not cfg.embeddings.enabled:
        return None
    if world_size > 1:
        log.warning("trainable ID embeddings are off under torchrun (one process owns the table)",
                    world_size=world_size)
        return None
    dim = cfg.train.embed_dim  # added to the document tower's output
    store = EmbeddingStore.from_config(
        cfg.embeddings, task.num_items, dim, cfg.state_dir, registry, seed=cfg.train.seed,
        keep_checkpoints=cfg.checkpoint.keep,
    )
    hook = EmbeddingHook(store, lr=cfg.train.lr)
    task.doc_extra = hook.rows
    trainer.p.hooks.append(hook)
    trainer.p.stateful["embeddings"] = hook
    state.sections["embeddings"] = store.status
    return hook
