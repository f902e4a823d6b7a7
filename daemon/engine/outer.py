"""The outer step: apply the pseudo-gradient with Nesterov SGD.

Every ``inner_steps_per_outer`` inner steps the pseudo-gradient (parameters
at the last outer step minus parameters now) is reduced across peers and
applied to the anchor copy by SGD with Nesterov momentum at ``outer_lr``;
the model then continues from the new anchor. Who the peers are is the outer
sync's business (``daemon/sync``), injected as ``reduce``: the identity alone
or under DDP, an averaging all-reduce over the torchrun ranks (DiLoCo).

Of a sharded model (``train.sharding=fsdp``) each rank steps its own slices: the anchor,
the momentum and the pseudo-gradient are those of the parameters' shards this rank holds,
so the outer state is split over the ranks like the parameters. With ``offload`` the
anchor and momentum live in host memory; the pseudo-gradient is still formed and reduced
beside the model (a collective runs on the model's device), and only the few elementwise
operations of the step touch the host copies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from daemon.sharding import local

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
        offload: bool = False,
    ) -> None:
        # This rank's part of each parameter (the whole parameter unless the model is sharded).
        self.params = [local(p) for p in params]
        self.lr = lr
        self.momentum = momentum
        self.reduce = reduce
        # Without offload the anchor and momentum live beside the model (same device): the
        # outer step is a few elementwise ops, not worth a host round trip.
        pin = offload and any(p.is_cuda for p in self.params)
        self.anchor = [self._home(p.detach().clone(), offload, pin) for p in self.params]
        self.buf = [self._home(torch.zeros_like(p), offload, pin) for p in self.params]

    @staticmethod
    def _home(t: torch.Tensor, offload: bool, pin: bool) -> torch.Tensor:
        if not offload:
            return t
        host = t.to("cpu")
        return host.pin_memory() if pin else host

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
        """Anchor minus parameters, on the parameters' device (where the reduction runs)."""
        return [a.to(p.device, non_blocking=True) - p.detach() for a, p in zip(self.anchor, self.params, strict=True)]

    @torch.no_grad()
    def apply(self, grads: list[torch.Tensor]) -> dict[str, Any]:
        """Nesterov SGD on the anchor with the (reduced) pseudo-gradient; the model continues
        from the new anchor."""
        norm_sq = 0.0
        for a, b, g, p in zip(self.anchor, self.buf, grads, self.params, strict=True):
            norm_sq += float(g.float().pow(2).sum())
            g = g.to(b.device)
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
