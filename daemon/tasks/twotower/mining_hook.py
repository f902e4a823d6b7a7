"""Hard-negative mining in the two-tower training loop.

:class:`MiningHook` is three things at once:

- the task's ``negatives`` callable: every micro-batch writes its document (and,
  from the epoch before ``mining.start_epoch``, query) embeddings into the miner's
  banks; from ``mining.start_epoch`` on it starts the miner once, takes this
  micro-batch's negatives (never waiting for FAISS) and keeps the next
  ``miner.lookahead`` micro-batches submitted;
- a ``StepHook``: it logs the queue-health line every ``telemetry.queue_health_every``
  inner steps while mining runs;
- a lifecycle component: ``start()`` does nothing (the miner thread starts at
  ``mining.start_epoch``, from the training loop) and ``stop()`` joins the miner
  thread within the shutdown deadline.

Batch keys. The miner names batches by an integer that grows in training order and
uses the same number as its TTL clock. One inner step holds ``accumulation``
micro-batches, each with its own negatives, so the key is the global micro-batch
counter ``(epoch - 1) * batches_per_epoch + batch_index``, from the position each
batch carries; upcoming batches (across epoch boundaries too) come from a private
copy of the trainer's sampler, so the trainer's cached permutation is never switched
back and forth.

Upcoming queries. A batch is submitted with the query embeddings its items had when
they were last trained (``submit_ids``, no extra forward pass). Items without one (the
first mining epoch when ``start_epoch`` <= 1, the epoch after a resume: the banks are
not checkpointed, or the items ``drop_last`` left out of the last epoch) are encoded
with a no-grad forward of the query tower instead, only those items.

Not checkpointed. The memory bank (num_docs x embed_dim float32: 100 MB at the
defaults) is refilled by one epoch of training, so it is not in the checkpoint; after a
resume the index is rebuilt each time the bank has doubled until it is full, so it does
not keep the few documents seen at the first mining step until ``refresh_steps``.
Resuming with mining on is therefore not bit-exact (neither is asynchronous mining).
A non-finite restore or an abandoned step moves the keys back: those micro-batches use
memory-bank negatives until the keys pass the last one submitted.

Under torchrun each rank runs its own miner over the documents of its own shares
(the sampler copy has the rank); see ``build_mining`` for what a shared bank would need.
"""

from __future__ import annotations

import hashlib

import numpy as np
import structlog
import torch
from prometheus_client import CollectorRegistry

from daemon.config import Config
from daemon.data.generated.corpus import Corpus
from daemon.engine.protocols import StepContext
from daemon.engine.sampler import EpochSampler
from daemon.tasks.twotower.config import MiningConfig, TwoTowerConfig
from daemon.tasks.twotower.mining.hardneg import HardNegativeMiner
from daemon.tasks.twotower.task import TwoTowerBatch, TwoTowerModel

log = structlog.get_logger("minerd.mining")


class MiningHook:
    """Feeds mined negatives to the loss; a StepHook and a lifecycle component."""

    name = "mining"

    def __init__(
        self,
        miner: HardNegativeMiner,
        corpus: Corpus,
        model: TwoTowerModel,
        sampler: EpochSampler,
        device: torch.device,
        queue_health_every: int,
    ) -> None:
        self.miner = miner
        self.corpus = corpus
        self.model = model  # the module itself, never a DDP wrapper: its query tower encodes upcoming batches
        self.device = device
        s = sampler
        self._sampler = EpochSampler(s.num_items, s.batch_size, s.seed, s.rank, s.world_size, s.drop_last)
        self._batches_per_epoch = s.batches_per_epoch
        self._every = queue_health_every
        self._started = False
        self._built_with = 0  # bank rows when the last growth refresh was requested

    # -- lifecycle component -------------------------------------------------------------

    def start(self) -> None:
        """Nothing: the miner thread starts at ``mining.start_epoch``, from the training loop."""

    def stop(self, timeout: float) -> None:
        self.miner.stop(timeout)

    # -- the task's negatives callable (every micro-batch) ----------------------------------

    def key(self, epoch: int, batch_index: int) -> int:
        """The global micro-batch counter: the batch key and the miner's TTL clock."""
        return (epoch - 1) * self._batches_per_epoch + batch_index

    def __call__(
        self, step: int, batch: TwoTowerBatch, q: torch.Tensor, d: torch.Tensor
    ) -> torch.Tensor | None:
        epoch = batch.pos.epoch
        self.miner.observe_docs(batch.ids, d.detach())
        if epoch >= self.miner.cfg.start_epoch - 1:  # submit_ids needs last epoch's queries
            self.miner.observe_queries(batch.ids, q.detach())
        if not self.miner.active(epoch):
            return None
        key = self.key(epoch, batch.pos.index)
        self._ensure_started(epoch)
        vecs, _source = self.miner.negatives(key, key, q.detach(), batch.ids)
        # After negatives(): the FIFO has room again for the newest upcoming batch.
        for ahead in self.miner.upcoming(key):
            self._submit(key, ahead)
        return vecs

    def _ensure_started(self, epoch: int) -> None:
        bank = self.miner.bank
        if not self._started:
            self._started = True
            self._built_with = bank.filled_count
            self.miner.start()
            log.info("hard-negative mining started", epoch=epoch,
                     bank_docs=bank.filled_count, lookahead=self.miner.lookahead)
        elif self._built_with < bank.num_docs and bank.filled_count >= 2 * self._built_with:
            # A partly filled bank (start_epoch 1, or a resume): index the new rows too.
            self._built_with = bank.filled_count
            self.miner.miner.request_refresh()

    def _submit(self, step: int, key: int) -> None:
        epoch, index = divmod(key, self._batches_per_epoch)
        ids = self._sampler.batch(epoch + 1, index)
        qbank = self.miner.query_bank
        if qbank is not None and qbank.has(ids):
            self.miner.submit_ids(step, key, ids)
            return
        if qbank is None:
            self.miner.submit(step, key, self._encode_queries(ids), ids)
            return
        # Only the items without a query embedding are encoded: with drop_last, the few
        # items an epoch leaves out put one into a third of the next epoch's batches
        # (20k items, batches of 256), and encoding whole batches for them cost ~14 ms each.
        missing = torch.from_numpy(~qbank.written(ids))
        queries = torch.from_numpy(qbank.gather(ids))
        queries[missing] = self._encode_queries(ids[missing]).to("cpu")
        self.miner.submit(step, key, queries, ids)

    def _encode_queries(self, ids: torch.Tensor) -> torch.Tensor:
        """Query embeddings of items ``ids`` from a no-grad forward of the query tower."""
        with torch.no_grad():
            feats = self.corpus.query_feats.index_select(0, ids).to(self.device)
            return self.model.encode_queries(feats)

    # -- StepHook -------------------------------------------------------------------------

    def before_inner_step(self, step: StepContext) -> None:
        return None

    def after_inner_step(self, step: StepContext) -> None:
        at = step.global_step
        if self._started and at % self._every == 0:
            log.info(self.miner.queue_health_line(at), line=True, global_step=at)


def build_mining(
    cfg: Config,
    corpus: Corpus,
    model: TwoTowerModel,
    sampler: EpochSampler,
    device: torch.device,
    registry: CollectorRegistry,
) -> MiningHook:
    """The miner and its hook: the task's negatives, a step hook and a lifecycle component
    (its stop() joins the miner thread).

    Under torchrun every rank gets its own miner, fed only the documents of its own batch
    shares; nothing here talks across ranks, so rank 0 alone or each rank alone works. A
    shared bank would need an all-gather of every micro-batch's document embeddings (or
    one miner per node fed by all its ranks), and the per-rank miner threads must fit the
    cores (configure_threads already subtracts ``faiss_threads`` per process).
    """
    num_items = corpus.num_train  # the documents trained on: only they are ever in the bank
    miner = HardNegativeMiner.from_config(MiningConfig.of(cfg), num_items, TwoTowerConfig.of(cfg).embed_dim, registry,
                                          cfg.train.seed, content=content_keys(corpus.doc_feats[:num_items]))
    return MiningHook(miner, corpus, model, sampler, device, cfg.telemetry.queue_health_every)


def content_keys(docs: torch.Tensor) -> np.ndarray:
    """A key of each document's content: equal keys, the same features.

    Rows are hashed (BLAKE2b, 16 bytes) chunk by chunk rather than compared whole: a
    sort of the rows themselves would copy the corpus (2 GB of token ids for a million
    documents). Two different documents sharing a key would take a 2^-64 chance per
    pair, and would only drop one candidate negative.
    """
    digests = np.empty(len(docs), dtype="S16")
    for start in range(0, len(docs), 65536):
        chunk = docs[start:start + 65536].detach().cpu()
        rows = np.ascontiguousarray(chunk.reshape(len(chunk), -1).numpy())
        digests[start:start + len(rows)] = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]
    _, keys = np.unique(digests, return_inverse=True)
    return keys.reshape(-1).astype(np.int64)
