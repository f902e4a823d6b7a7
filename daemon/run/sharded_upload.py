"""Upload revisions of a sharded model: the gate on rank 0, the weights gathered by all.

Reading a sharded model's whole weights is a collective, so every rank runs this hook
after every inner step, while only rank 0 has the uploader. Rank 0 offers the step to the
uploader as usual, with a stand-in for the model (:class:`GatheredModel`): the first time
the uploader looks at the weights (which it does only once the gate allowed the step) the
stand-in tells the other ranks to join, and all of them gather the weights, one tensor at
a time into rank 0's host memory (never a whole copy on a GPU), and the pseudo-gradient
when the revision carries it. Every step ends with one broadcast that says whether a
gather happened, so the ranks' collectives always pair up.

A sharded model's revision carries no ``optimizer.pt``: its optimizer state is twice the
weights, held in slices on every rank; the checkpoint keeps it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from daemon.engine.protocols import StepContext
from daemon.sharding import full_tensors, full_weights
from daemon.state import MinerState
from daemon.upload import Uploader

GATHER, DONE = 1, 0


def _say(flag: int, device: torch.device) -> int:
    """Rank 0's word to the others (every rank calls it; the others get rank 0's flag)."""
    t = torch.tensor([flag], device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


class Gathered:
    """The whole weights (and pseudo-gradient) of the sharded model at this step, gathered the
    first time anyone asks; on rank 0 only the asking happens, and its ``ensure`` tells the
    other ranks to join."""

    def __init__(self, model: nn.Module, anchor: list[torch.Tensor] | None, device: torch.device) -> None:
        self.model, self.anchor, self.device = model, anchor, device
        self.weights: dict[str, torch.Tensor] | None = None
        self.anchor_whole: dict[str, torch.Tensor] = {}

    def gather(self) -> None:
        """Every rank: the weights, then the outer round's starting weights when asked (the
        uploader subtracts, as it does for a model that is not sharded)."""
        self.weights = full_weights(self.model)
        if self.anchor is not None:
            self.anchor_whole = full_tensors(self.model.named_parameters(), self.anchor)

    def ensure(self) -> dict[str, torch.Tensor]:
        if self.weights is None:
            _say(GATHER, self.device)
            self.gather()
        assert self.weights is not None
        return self.weights


class GatheredModel(nn.Module):
    """What rank 0's uploader sees for the model: the whole weights as plain tensors in host
    memory, gathered on first use."""

    def __init__(self, gathered: Gathered) -> None:
        super().__init__()
        self._gathered = gathered

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return dict(self._gathered.ensure())

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        weights = self._gathered.ensure()
        for name, _ in self._gathered.model.named_parameters():
            yield name, weights[name]  # type: ignore[misc]

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p


class ShardedUploadHook:
    """On every rank of a sharded job; ``uploader`` on rank 0 only (None elsewhere)."""

    def __init__(self, uploader: Uploader | None, state: MinerState, device: torch.device, pseudo: bool) -> None:
        self.uploader = uploader
        self.state = state
        self.device = device
        self.pseudo = pseudo  # the revision carries the pseudo-gradient (upload.artifact)

    def before_inner_step(self, step: StepContext) -> None:
        return None

    def after_inner_step(self, step: StepContext) -> None:
        gathered = Gathered(step.model, list(step.anchor) if self.pseudo else None, self.device)
        if self.uploader is None:
            while _say(DONE, self.device) == GATHER:  # rank 0 asked: join it, then hear the end
                gathered.gather()
            return
        if self.state.controls.upload.is_set():
            self.state.controls.upload.clear()
            self.uploader.request_upload()
        loss = step.loss if step.loss is not None else float("nan")
        try:
            anchor = _LazyAnchor(gathered, step.model) if self.pseudo else None
            self.uploader.on_inner_step(step.outer_step, step.inner_step, loss, GatheredModel(gathered), None,
                                        anchor=anchor, global_step=step.global_step)
        finally:
            _say(DONE, self.device)


class _LazyAnchor(list[torch.Tensor]):
    """The whole anchor in ``named_parameters`` order, gathered when the uploader first reads it."""

    def __init__(self, gathered: Gathered, model: nn.Module) -> None:
        super().__init__()
        self._gathered, self._model, self._filled = gathered, model, False

    def _fill(self) -> None:
        if not self._filled:
            self._filled = True
            self._gathered.ensure()
            super().extend(self._gathered.anchor_whole[n] for n, _ in self._model.named_parameters())

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._fill()
        return super().__iter__()

    def __len__(self) -> int:
        self._fill()
        return super().__len__()
