"""Next-token prediction on packed sequences of a prepared token dataset.

Each training shard of the prepared dataset is cut into ``lm.seq_len + 1``-token windows
that overlap by one token (inputs are a window's first ``seq_len`` tokens, targets its last
``seq_len``), numbered across shards: a sequence id is one slice of one shard and a
micro-batch one gather per shard it touches, in the order data/prepared/order.py replays.
Documents run into each other across the end-of-text token, as in GPT-style pretraining.

Evaluation reads a fixed set of ``lm.eval_sequences`` windows spread evenly over the first
held-out shards and reports the mean loss per token (nats), its perplexity, and bits
per byte: the summed loss in bits over the UTF-8 bytes those targets decode to, which
compares models with different tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from daemon.config import Config, ConfigError, problem
from daemon.data.prepared.dataset import PreparedDataset
from daemon.data.prepared.order import DatasetOrder
from daemon.data.prepared.record import replay_ids
from daemon.engine.protocols import BatchPos, EvalPoint, EvalResult
from daemon.tasks.causal_lm.config import LmConfig
from daemon.tasks.causal_lm.model import unwrap

REPLAY_SEQUENCES = 32  # of a miner's window, scored before and after its submission

EVAL_GAUGES = {
    "loss": ("minerd_eval_loss", "Held-out loss per token (nats) of the last evaluation"),
    "perplexity": ("minerd_eval_perplexity", "Held-out perplexity of the last evaluation"),
    "bits_per_byte": ("minerd_eval_bits_per_byte", "Held-out bits per UTF-8 byte of the last evaluation"),
    "loss_rises": ("minerd_eval_loss_rises", "Evaluations in a row whose held-out loss rose over the one before"),
}


class CausalLmTask:
    name = "causal_lm"

    def __init__(self, cfg: Config, data: PreparedDataset, order: DatasetOrder, tokenizer: PreTrainedTokenizerBase,
                 where: str = "lm.corpus") -> None:
        lm = LmConfig.of(cfg)
        self.cfg = cfg
        self.seq_len = lm.seq_len
        self.eval_every_steps = lm.eval_every_steps
        # Shards read in place need no asking ahead: the walk is not computed per batch for them.
        self.data, self.order = data, order
        self.prefetch = lm.prefetch_shards if data.reader.fetches else 0
        self._num_items = data.num_sequences
        if order.batches_per_epoch == 0:
            raise ConfigError([problem(
                where, f"the training split holds {self._num_items} sequences of lm.seq_len={self.seq_len} "
                "tokens, fewer than one batch of every rank and replica; add text or lower lm.seq_len",
                data.index.tokens("train"))])
        self.eval_set = torch.from_numpy(data.eval_rows(lm.eval_sequences))
        if len(self.eval_set) == 0:
            raise ConfigError([problem(
                "lm.eval_fraction", f"the held-out split has {data.eval_tokens()} tokens, not one sequence of "
                f"lm.seq_len+1; raise lm.eval_fraction or add documents", lm.eval_fraction)])
        self.eval_bytes = sum(
            len(str(tokenizer.decode(row[1:].tolist(), skip_special_tokens=True)).encode("utf-8"))
            for row in self.eval_set
        )
        self._prev_loss: float | None = None
        self._rises = 0

    @property
    def num_items(self) -> int:
        return self._num_items

    def get_batch(self, idx: torch.Tensor, device: torch.device, pos: BatchPos) -> torch.Tensor:
        if self.prefetch:  # the shards the walk reaches next, fetched while this batch trains
            self.data.prefetch(self.order.shards_ahead(pos.epoch, pos.index, self.prefetch))
        batch = torch.from_numpy(self.data.rows(idx.numpy()))  # one gather per shard touched
        if device.type == "cuda":
            return batch.pin_memory().to(device, non_blocking=True)
        return batch

    def loss(self, model: nn.Module, batch: torch.Tensor, step: int) -> torch.Tensor:
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        # The softmax in float32 under bf16 autocast: the loss is a sum over the vocabulary.
        return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())

    @torch.no_grad()
    def _nats(self, model: nn.Module, device: torch.device, beat: Callable[[], None]) -> tuple[float, int]:
        m = unwrap(model)  # never a DDP wrapper: only the main rank evaluates
        was_training = m.training
        m.eval()
        nats = 0.0
        count = 0
        for chunk in self.eval_set.split(self.cfg.train.batch_size):
            x = chunk.to(device)
            logits = m(input_ids=x[:, :-1], use_cache=False).logits
            nats += float(F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum"))
            count += x[:, 1:].numel()
            beat()
        if was_training:
            m.train()
        return nats, count

    def held_out_loss(self, model: nn.Module, device: torch.device, beat: Callable[[], None] = lambda: None) -> float:
        """The mean held-out loss per token, and nothing else (no evaluation is counted): what
        the bucket exchange scores submissions by."""
        nats, count = self._nats(model, device, beat)
        return nats / count

    @torch.no_grad()
    def replayed_loss(self, model: nn.Module, device: torch.device, record: Any) -> float | None:
        """The mean loss on (the first ``REPLAY_SEQUENCES`` of) the sequences a miner says it
        trained on in its last window, recomputed from its data record as a validator does; None
        when the record is not one of this dataset or does not add up. The record is untrusted:
        every number is checked before it sizes anything."""
        try:
            ids = replay_ids(self.data.index, record, self.seq_len, REPLAY_SEQUENCES)
        except (KeyError, TypeError, ValueError, ConfigError):
            return None
        if ids is None:
            return None
        m = unwrap(model)
        was_training = m.training
        m.eval()
        x = torch.from_numpy(self.data.rows(ids)).to(device)
        logits = m(input_ids=x[:, :-1], use_cache=False).logits
        loss = float(F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten()))
        if was_training:
            m.train()
        return loss

    def evaluate(self, model: nn.Module, device: torch.device, at: EvalPoint, beat: Callable[[], None]) -> EvalResult:
        nats, count = self._nats(model, device, beat)
        loss = nats / count
        ppl = math.exp(min(loss, 700.0))  # exp overflows a float past ~709
        bpb = nats / math.log(2) / max(self.eval_bytes, 1)
        self._rises = self._rises + 1 if self._prev_loss is not None and loss > self._prev_loss else 0
        self._prev_loss = loss
        line = f"Eval @ step {at.global_step}: loss={loss:.3f} ppl={ppl:.2f} bpb={bpb:.3f}"
        return EvalResult({"loss": loss, "perplexity": ppl, "bits_per_byte": bpb, "loss_rises": self._rises}, line)
