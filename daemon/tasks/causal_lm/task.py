"""Next-token prediction on packed sequences of the token cache.

The training split's token stream is cut into ``lm.seq_len + 1``-token windows that
overlap by one token (inputs are a window's first ``seq_len`` tokens, targets its last
``seq_len``): item ``i`` starts at token ``i * seq_len``, so an item is one slice and a
micro-batch one gather. Documents run into each other across the end-of-text token,
as in GPT-style pretraining.

Evaluation reads a fixed set of ``lm.eval_sequences`` windows spread evenly over the
held-out split and reports the mean loss per token (nats), its perplexity, and bits
per byte: the summed loss in bits over the UTF-8 bytes those targets decode to, which
compares models with different tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from daemon.config import Config, ConfigError, problem
from daemon.data.text.tokens import Tokens
from daemon.engine.protocols import BatchPos, EvalPoint, EvalResult
from daemon.tasks.causal_lm.config import LmConfig
from daemon.tasks.causal_lm.model import unwrap

EVAL_GAUGES = {
    "loss": ("minerd_eval_loss", "Held-out loss per token (nats) of the last evaluation"),
    "perplexity": ("minerd_eval_perplexity", "Held-out perplexity of the last evaluation"),
    "bits_per_byte": ("minerd_eval_bits_per_byte", "Held-out bits per UTF-8 byte of the last evaluation"),
    "loss_rises": ("minerd_eval_loss_rises", "Evaluations in a row whose held-out loss rose over the one before"),
}


def eval_windows(stream: np.ndarray, seq_len: int, count: int) -> torch.Tensor:
    """``count`` non-overlapping windows of ``seq_len + 1`` tokens spread evenly over ``stream``."""
    available = (len(stream) - 1) // seq_len
    n = min(count, available)
    starts = (np.arange(n, dtype=np.int64) * available // max(n, 1)) * seq_len
    rows = stream[starts[:, None] + np.arange(seq_len + 1)]
    return torch.from_numpy(rows.astype(np.int64))


class CausalLmTask:
    name = "causal_lm"

    def __init__(self, cfg: Config, tokens: Tokens, tokenizer: PreTrainedTokenizerBase, world_size: int = 1) -> None:
        lm = LmConfig.of(cfg)
        self.cfg = cfg
        self.seq_len = lm.seq_len
        self.eval_every_steps = lm.eval_every_steps
        self.train_stream = tokens.train
        self._offsets = torch.arange(self.seq_len + 1).numpy()
        self._num_items = max(0, (len(tokens.train) - 1) // self.seq_len)
        per_step = cfg.train.batch_size * world_size
        if self._num_items < per_step:
            raise ConfigError([problem(
                "lm.corpus", f"the training split holds {self._num_items} sequences of lm.seq_len={self.seq_len} "
                f"tokens, fewer than one batch ({per_step}); add text or lower lm.seq_len", len(tokens.train))])
        self.eval_set = eval_windows(tokens.eval, self.seq_len, lm.eval_sequences)
        if len(self.eval_set) == 0:
            raise ConfigError([problem(
                "lm.eval_fraction", f"the held-out split has {len(tokens.eval)} tokens, not one sequence of "
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
        starts = idx.numpy() * self.seq_len
        rows = self.train_stream[starts[:, None] + self._offsets]  # one gather from the memory map
        batch = torch.from_numpy(rows.astype(np.int64))
        if device.type == "cuda":
            return batch.pin_memory().to(device, non_blocking=True)
        return batch

    def loss(self, model: nn.Module, batch: torch.Tensor, step: int) -> torch.Tensor:
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        # The softmax in float32 under bf16 autocast: the loss is a sum over the vocabulary.
        return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, at: EvalPoint, beat: Callable[[], None]) -> EvalResult:
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
        loss = nats / count
        ppl = math.exp(min(loss, 700.0))  # exp overflows a float past ~709
        bpb = nats / math.log(2) / max(self.eval_bytes, 1)
        self._rises = self._rises + 1 if self._prev_loss is not None and loss > self._prev_loss else 0
        self._prev_loss = loss
        line = f"Eval @ step {at.global_step}: loss={loss:.3f} ppl={ppl:.2f} bpb={bpb:.3f}"
        return EvalResult({"loss": loss, "perplexity": ppl, "bits_per_byte": bpb, "loss_rises": self._rises}, line)
