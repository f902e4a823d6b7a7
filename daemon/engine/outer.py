"""The outer step: apply the pseudo-gradient with Nesterov SGD.

Every ``inner_steps_per_outer`` inner steps the pseudo-gradient (parameters
at the last outer step minus parameters now) is reduced across peers and
applied to the anchor copy by SGD with Nesterov momentum at ``outer_lr``;
the model then continues from the new anchor. Who the peers are is the outer
sync's business (``daemon/sync``), injected as ``reduce``: the identity alone
or under DDP, an averaging all-reduce over the torchrun ranks (DiLoCo).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

# Reduces the pseudo-gradients in place; may return what it did, for the outer step's log line.
Reduce = Callable[[list[torch.Tensor]], "dict[str, float] | None"]


def identity_reduce(_: list[torch.Tensor]) -> None:
    return None


def norm(tensors: Sequence[torch.Tensor]) -> float:
    return float(sum(float(t.float().pow(2).sum()) for t in tensors)) ** 0.5


def update_problem(reduced: Sequence[torch.Tensor], local_norm: float, max_ratio: float = 0.0) -> str | None:
    """Why an averaged pseudo-gradient must not be applied, or None.

    Not finite: one peer's NaN would otherwise be committed and checkpointed by everyone.
    With ``max_ratio`` > 0, a norm over ``max_ratio`` times this replica's own: an average of
    honest peers' updates is no longer than the longest of them, so a far longer one means a
    peer sent something else (a replica with nothing trained yet, local norm 0, has nothing to
    compare with and checks finiteness only).
    """
    total = norm(reduced)
    if not math.isfinite(total):
        bad = sum(int((~torch.isfinite(t)).sum()) for t in reduced)
        return f"the averaged update is not finite ({bad} values)"
    if max_ratio > 0 and local_norm > 0 and total > max_ratio * local_norm:
        return (f"the averaged update's norm {total:.4g} is over {max_ratio:g} times this replica's own "
                f"({local_norm:.4g})")
    return None


class OuterOptimizer:
    def __init__(
        self,
        params: Sequence[torch.Tensor],
        lr: float,
        momentum: float,
        reduce: Reduce = identity_reduce,
    ) -> None:
        self.params = list(params)
        self.lr = lr
        self.momentum = momentum
        self.reduce = reduce
        # The anchor and momentum live beside the model (same device): the
        # outer step is a few elementwise ops, not worth a host round trip.
        self.anchor = [p.detach().clone() for p in self.params]
        self.buf = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> dict[str, Any]:
        """Apply one outer step; returns the reduced pseudo-gradient's L2 norm
        (``pseudo_grad_norm``) and whatever the reduction reported. A reduced pseudo-gradient
        that is not finite is not applied: the anchor stays, and the round's progress goes
        with the next outer step (every rank sees the same average, so all of them skip it)."""
        grads = self.pseudo_gradient()
        report = self.reduce(grads) or {}
        problem = update_problem(grads, 0.0)
        if problem is not None:
            return {"committed": False, "error": problem, **report}
        return {**self.apply(grads), **report}

    def pseudo_gradient(self) -> list[torch.Tensor]:
        return [a - p.detach() for a, p in zip(self.anchor, self.params, strict=True)]

    @torch.no_grad()
    def apply(self, grads: list[torch.Tensor]) -> dict[str, Any]:
        """Nesterov SGD on the anchor with the (reduced) pseudo-gradient; the model continues
        from the new anchor."""
        norm_sq = 0.0
        for a, b, g, p in zip(self.anchor, self.buf, grads, self.params, strict=True):
            norm_sq += float(g.float().pow(2).sum())
            b.mul_(self.momentum).add_(g)
            a.sub_(g.add(b, alpha=self.momentum), alpha=self.lr)
            p.copy_(a)
        return {"pseudo_grad_norm": round(norm_sq**0.5, 6)}

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": [a.cpu() for a in self.anchor], "buf": [b.cpu() for b in self.buf]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for dst, src in zip(self.anchor, state["anchor"], strict=True):
            dst.copy_(src)
        for dst, src in zip(self.buf, state["buf"], strict=True):
            dst.copy_(src)
