"""The weights, the optimizer and the outer state of a sharded model, in and out of a
checkpoint (``torch.distributed.checkpoint``).

A sharded model's checkpoint is written by every rank at once: each rank writes the
slices it holds, rank 0 the metadata that says which slices make each tensor
(``daemon/checkpoint.py`` keeps the rest of a checkpoint and its atomicity). Because the
metadata describes whole tensors, the checkpoint can be read by any number of ranks,
each taking the slices it now holds: a job of 2 ranks resumes on 1, or on 4, and a
process alone (no sharding) reads it as whole tensors.

Keys are the parameters' names (not their positions), for the weights, for AdamW's
moments and for the outer step's anchor and momentum alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from daemon.engine.protocols import OuterStep
from daemon.sharding import is_sharded, local, reshard


class ShardedState:
    """``model``'s weights, ``optimizer``'s state and ``outer``'s anchor and momentum, keyed by
    parameter name; each rank's part of them when the model is sharded."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, outer: OuterStep) -> None:
        self.model = model
        self.optimizer = optimizer
        self.outer = outer
        if is_sharded(model):
            reshard(model)  # the parameters as this rank's slices, not as whole tensors gathered
        self.named = list(model.named_parameters())  # the outer state's order (tied weights once)

    def _wrap(self, values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's slices of the outer state as tensors of the parameters' own layout."""
        out: dict[str, torch.Tensor] = {}
        for (name, p), v in zip(self.named, values, strict=True):
            if isinstance(p, DTensor):
                # On the parameter's device: a checkpoint's metadata is one layout per tensor.
                v = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, shape=p.shape,
                                       stride=p.stride(), run_check=False)
            out[name] = v
        return out

    def state_dict(self) -> dict[str, Any]:
        model, optim = get_state_dict(self.model, self.optimizer)
        outer = self.outer.state_dict()
        return {"model": model, "optim": optim,
                "outer": {"anchor": self._wrap(outer["anchor"]), "buf": self._wrap(outer["buf"])}}

    def tensors(self) -> list[torch.Tensor]:
        """Every floating tensor a checkpoint would hold (for the finiteness check)."""
        found: list[torch.Tensor] = []

        def walk(x: Any) -> None:
            if isinstance(x, torch.Tensor):
                if x.is_floating_point():
                    found.append(x)
            elif isinstance(x, dict):
                for v in x.values():
                    walk(v)
            elif isinstance(x, list | tuple):
                for v in x:
                    walk(v)

        walk(self.state_dict())
        return found

    def save(self, folder: Path) -> None:
        """Every rank writes its slices into ``folder`` (a collective); rank 0 the metadata."""
        dcp.save(self.state_dict(), checkpoint_id=str(folder))

    def load(self, folder: Path) -> None:
        """Take the weights, the optimizer and the outer state from ``folder``, whatever number of
        ranks wrote it (a collective under torchrun)."""
        state = self.state_dict()
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        outer = self.outer.state_dict()
        for key in ("anchor", "buf"):
            restored = state["outer"][key]
            outer[key] = [local(restored[name]) for name, _ in self.named]
        self.outer.load_state_dict(outer)

    def load_whole(self, weights: dict[str, torch.Tensor], training: dict[str, Any]) -> None:
        """Take a checkpoint of whole tensors (written by a job that did not shard) into this
        sharded model: each rank keeps its slices of every tensor."""
        set_model_state_dict(self.model, cast(dict[str, Any], weights),
                             options=StateDictOptions(full_state_dict=True, strict=False))
        names = [name for name, _ in self.named]
        optim = training["optimizer"]
        by_name: dict[str, Any] = {"state": {names[int(i)]: v for i, v in optim["state"].items()},
                   "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                    for g in optim["param_groups"]]}
        set_optimizer_state_dict(self.model, self.optimizer, by_name,
                                 options=StateDictOptions(full_state_dict=True))
        outer = training["outer"]
        sliced = {key: [_slice(whole, p) for whole, (_, p) in zip(outer[key], self.named, strict=True)]
                  for key in ("anchor", "buf")}
        self.outer.load_state_dict(sliced)


def _slice(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's slice of ``whole``, laid out as parameter ``like`` is."""
    if not isinstance(like, DTensor):
        return whole
    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements).to_local()
