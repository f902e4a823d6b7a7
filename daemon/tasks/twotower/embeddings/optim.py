"""Sparse update rules for rows read from an :class:`EmbeddingStore`.

The trainer reads ``e = store.get_embeddings(ids, requires_grad=True)``, runs
forward and backward, then calls one of these with the same ``ids`` and ``e``:
the gradient of a row that appears several times in ``ids`` is the sum over its
occurrences, and each distinct row is written back once. The values read are
taken from ``e`` itself, so no second lookup is made.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from daemon.tasks.twotower.embeddings.store import EmbeddingStore, _as_numpy


def _coalesce(ids: Any, leaf: torch.Tensor) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Distinct ids, their current values and their summed gradients."""
    if leaf.grad is None:
        raise ValueError("the embeddings have no gradient: read them with requires_grad=True and backward")
    idx = _as_numpy(ids, np.int64).reshape(-1)
    uniq, first, inverse = np.unique(idx, return_index=True, return_inverse=True)
    values = leaf.detach().cpu()[torch.from_numpy(first)]
    grad = torch.zeros_like(values).index_add_(
        0, torch.from_numpy(inverse.reshape(-1)), leaf.grad.detach().cpu().float()
    )
    return uniq, values, grad


@torch.no_grad()
def apply_sparse_sgd(store: EmbeddingStore, ids: Any, leaf: torch.Tensor, lr: float, weight_decay: float = 0.0) -> None:
    """Plain SGD on the rows in ``ids``: ``row -= lr * (grad + weight_decay * row)``."""
    uniq, values, grad = _coalesce(ids, leaf)
    if weight_decay:
        grad.add_(values, alpha=weight_decay)
    store.update_embeddings(uniq, values.sub_(grad, alpha=lr))


class SparseRowAdam:
    """Adam with per-row state, touching only the rows of each batch ("lazy" Adam).

    Moments live in memory, 8 bytes per value (200k x 128 rows: 205 MB); each row
    keeps its own step count, so bias correction is exact for rows seen rarely.
    Checkpoint it with :meth:`state_dict` next to the store's ``checkpoint_state()``.
    """

    def __init__(
        self,
        store: EmbeddingStore,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or eps <= 0:
            raise ValueError(f"bad Adam settings: lr={lr} betas={betas} eps={eps}")
        self.store = store
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        n, d = store.num_rows, store.embedding_dim
        self.exp_avg = torch.zeros(n, d)
        self.exp_avg_sq = torch.zeros(n, d)
        self.steps = torch.zeros(n, dtype=torch.int64)

    @torch.no_grad()
    def step(self, ids: Any, leaf: torch.Tensor) -> None:
        uniq, values, grad = _coalesce(ids, leaf)
        rows = torch.from_numpy(self.store.row_index(uniq))
        if self.weight_decay:
            grad.add_(values, alpha=self.weight_decay)
        b1, b2 = self.betas
        m = self.exp_avg[rows].mul_(b1).add_(grad, alpha=1 - b1)
        v = self.exp_avg_sq[rows].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        t = self.steps[rows] + 1
        self.exp_avg[rows], self.exp_avg_sq[rows], self.steps[rows] = m, v, t
        t_f = t.to(values.dtype).unsqueeze(1)
        m_hat = m / (1 - b1**t_f)
        v_hat = v / (1 - b2**t_f)
        self.store.update_embeddings(uniq, values - self.lr * m_hat / (v_hat.sqrt() + self.eps))

    def row_state(self) -> dict[str, torch.Tensor]:
        """The live per-row state (no copies): ``exp_avg``, ``exp_avg_sq``, ``steps``."""
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "steps": self.steps}

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay}

    def state_dict(self) -> dict[str, Any]:
        return {**{k: v.clone() for k, v in self.row_state().items()}, **self.hyperparameters()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.steps.copy_(state["steps"])
        self.lr, self.eps, self.weight_decay = state["lr"], state["eps"], state["weight_decay"]
        b1, b2 = state["betas"]
        self.betas = (float(b1), float(b2))
