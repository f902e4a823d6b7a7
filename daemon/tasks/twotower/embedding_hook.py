"""Trainable per-document ID embeddings, read and updated through the tiered store.

Each document's tower output gets its own trainable row added before the
normalisation. Rows are read for the batch's documents only (one vectorised
gather from the store), receive gradients like any leaf tensor, and are
updated sparsely after the inner step by a row-wise Adam: only the rows of
the batch are touched, so ``embeddings.storage_mode=disk`` trains a table far
larger than the L1/L2 tiers. A skipped (non-finite) inner step updates no row.

The store and the row optimiser's moments are part of the checkpoint: the
memory table itself, or in disk mode the pinned generation of chunk files. The
table and the moments go out as one row table (``daemon/rowtable.py``): after a
whole copy, a checkpoint writes only the rows changed since.

Under torchrun every rank holds the whole table (memory mode) and, after each
applied inner step, the ranks all-gather the ids and gradients of the rows
they touched; each applies the same row-wise Adam step to the union, so the
tables and moments stay identical everywhere, as DDP keeps dense parameters.
That is B x embed_dim floats per rank per inner step: small beside a dense
gradient, and the one exchange DiLoCo's inner steps make. Disk mode is one
process only (chunk files have one writer).
"""

from __future__ import annotations

import hashlib
from typing import Any

import structlog
import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry

from daemon.config import Config
from daemon.disk import DiskFullReporter
from daemon.engine.protocols import StepContext
from daemon.rowtable import RowTable
from daemon.tasks.twotower.config import EmbeddingsConfig, TwoTowerConfig
from daemon.tasks.twotower.embeddings.optim import SparseRowAdam
from daemon.tasks.twotower.embeddings.store import EmbeddingStore

log = structlog.get_logger("minerd.train")

LOG_EVERY_EPOCHS = 5
DIGEST_ROWS = 65536  # rows hashed per slice at a torchrun stop


class EmbeddingHook:
    name = "embeddings"

    def __init__(self, store: EmbeddingStore, lr: float, weight_decay: float = 0.0, world_size: int = 1) -> None:
        self.store = store
        self.world_size = world_size
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
    def before_inner_step(self, step: StepContext) -> None:
        self._pending.clear()  # rows read by a skipped step are not updated

    def after_inner_step(self, step: StepContext) -> None:
        self.adam.lr = step.lr
        scale = step.grad_scale
        pending = [(ids, leaf) for ids, leaf in self._pending if leaf.grad is not None]
        self._pending.clear()
        if dist.is_initialized() and dist.get_world_size() > 1:
            pending = self._gathered(pending, step)
        for ids, leaf in pending:
            if scale != 1.0:
                leaf.grad.div_(scale)  # type: ignore[union-attr]
            self.adam.step(ids, leaf)
        epoch = step.epoch
        if epoch != self._last_logged_epoch and (epoch - 1) % LOG_EVERY_EPOCHS == 0:
            self._last_logged_epoch = epoch
            log.info(self.store.cache_log_line(), line=True, epoch=epoch - 1)

    def _gathered(
        self, pending: list[tuple[torch.Tensor, torch.Tensor]], step: StepContext
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every rank's (ids, gradients) of this step, as one leaf over the union.

        Each rank reads the same number of rows per inner step (equal shares,
        drop_last), so fixed-size all-gathers suffice. Gradients are divided by
        the world size: the job's loss is the mean of the ranks' losses.
        """
        world, device = dist.get_world_size(), step.device
        ids = torch.cat([i for i, _ in pending]).to(device)
        grads = torch.cat([leaf.grad for _, leaf in pending]).to(device)  # type: ignore[misc]
        step.comm.add([ids, grads])  # counted with the dense traffic (comm_bytes)
        all_ids = torch.empty(world * len(ids), dtype=ids.dtype, device=device)
        all_grads = torch.empty((world * len(ids), grads.shape[1]), dtype=grads.dtype, device=device)
        dist.all_gather_into_tensor(all_ids, ids)
        dist.all_gather_into_tensor(all_grads, grads.contiguous())
        cpu_ids = all_ids.cpu()
        leaf = self.store.get_embeddings(cpu_ids, requires_grad=True)
        leaf.grad = all_grads.cpu().div_(world)
        return [(cpu_ids, leaf)]

    # ---- Stateful ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # The live table and moments, not copies: the checkpoint writer copies the rows it writes
        # (a few when only they changed), and a peer is sent the state before the next update.
        store, rows = self.store.checkpoint_state(copy=False), self.adam.row_state()
        if "table" in store:  # memory mode; in disk mode the chunk files hold the table
            rows["table"] = store.pop("table")
        return {"store": store, "adam": self.adam.hyperparameters(),
                "rows": RowTable.snapshot(rows, self.store.changes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        store, adam = dict(state["store"]), dict(state["adam"])
        if "rows" in state:  # else a checkpoint of minerd 0.1, the tables inline
            rows = dict(state["rows"].tensors)
            if "table" in rows:
                store["table"] = rows.pop("table")
            adam.update(rows)
        self.store.load_checkpoint_state(store)
        self.adam.load_state_dict(adam)

    # ---- Component -------------------------------------------------------------
    def start(self) -> None:
        return None

    def stop(self, timeout: float) -> None:
        if self.world_size > 1:
            # Ranks compare: identical tables, identical digests (memory mode: torchrun
            # refuses disk mode). Hashed in slices so a large table is never copied whole.
            h = hashlib.sha256()
            for lo in range(0, self.store.num_rows, DIGEST_ROWS):
                ids = torch.arange(lo, min(lo + DIGEST_ROWS, self.store.num_rows))
                h.update(self.store.get_embeddings(ids).numpy().tobytes())
            log.info("embedding table final", table_digest=h.hexdigest()[:16], rows=self.store.num_rows)
        self.store.close()  # writes the dirty chunks: a clean stop loses nothing


def build_embeddings(
    cfg: Config, num_items: int, registry: CollectorRegistry, world_size: int, on_disk_full: DiskFullReporter
) -> EmbeddingHook:
    """The store and its hook: the task's ``doc_extra``, a step hook, stateful, a component.

    Under torchrun each rank keeps an identical memory table (see the module docstring).
    """
    dim = TwoTowerConfig.of(cfg).embed_dim  # added to the document tower's output
    store = EmbeddingStore.from_config(
        EmbeddingsConfig.of(cfg), num_items, dim, cfg.state_dir, registry, seed=cfg.train.seed,
        keep_checkpoints=cfg.checkpoint.keep, on_disk_full=on_disk_full,
    )
    return EmbeddingHook(store, lr=cfg.train.lr, world_size=world_size)
