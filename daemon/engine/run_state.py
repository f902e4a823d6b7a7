"""What a run continues from: the weights, the inner and outer optimizers, the loss scaler,
the counters, the random state and the stateful parts (the embedding store).

The trainer's loop changes this state; this module reads and restores it whole: for a
checkpoint, from a checkpoint (of this job's sharding or another's), and for a replica
group's peer (torchft's recovery). A sharded model's weights, AdamW moments and outer
state are each rank's slices; a peer of the same rank in another replica group holds the
same slices, so they travel as they are, and a checkpoint holds them through
``ShardedState`` (``torch.distributed.checkpoint``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from daemon.checkpoint import Checkpoint
from daemon.engine.progress import Counters
from daemon.engine.protocols import OuterStep, Stateful
from daemon.engine.sharded import ShardedState
from daemon.sharding import local, local_tree, weights_digest, whole_weights

# Kept by ShardedState in a sharded checkpoint, beside the rest of the training state.
IN_SHARDS = ("optimizer", "outer")


class RunState:
    def __init__(self, model: Callable[[], nn.Module], optimizer: torch.optim.Optimizer, outer: OuterStep,
                 scaler: torch.amp.GradScaler, counters: Counters, stateful: dict[str, Stateful],
                 sharded: bool) -> None:
        self._model = model  # the model as trained (never a DDP wrapper)
        self.optimizer, self.outer, self.scaler = optimizer, outer, scaler
        self.counters = counters  # the trainer's own, updated in place
        self.stateful = stateful
        self.sharded = sharded

    @property
    def model(self) -> nn.Module:
        return self._model()

    def shards(self) -> ShardedState:
        return ShardedState(self.model, self.optimizer, self.outer)

    # ---- the training state beside the weights ----------------------------
    def training(self, last_loss: float | None) -> dict[str, Any]:
        """Everything but the weights that a run continues from: what a checkpoint stores, and
        what a live replica hands a recovering one."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "outer": self.outer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "counters": self.counters.as_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            "extra": {name: comp.state_dict() for name, comp in self.stateful.items()},
            "last_loss": last_loss,
        }

    def load_training(self, st: dict[str, Any]) -> float | None:
        """The training state beside the weights (a sharded checkpoint's optimizer and outer state
        are in its shards, not here); returns the last loss it held."""
        if "optimizer" in st:
            self.optimizer.load_state_dict(st["optimizer"])
        if "outer" in st:
            self.outer.load_state_dict(st["outer"])
        if st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        # In place: a recovery lands in the middle of an inner step that holds the counters.
        self.counters.__dict__.update(Counters(**st["counters"]).__dict__)
        torch.set_rng_state(st["rng"]["torch"])
        if torch.cuda.is_available() and st["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(st["rng"]["cuda"])
        for name, comp in self.stateful.items():
            if name in st.get("extra", {}):
                comp.load_state_dict(st["extra"][name])
        last = st.get("last_loss")
        return float(last) if last is not None else None

    # ---- checkpoints -------------------------------------------------------
    def restore(self, ckpt: Checkpoint) -> float | None:
        """Take a checkpoint, whichever sharding wrote it; returns its last loss."""
        if ckpt.sharded:  # any number of ranks wrote it; this job takes its own slices
            self.shards().load(ckpt.shards)
            return self.load_training(ckpt.state)
        if self.sharded:  # whole tensors, from a job that did not shard: each rank its slices
            self.shards().load_whole(ckpt.model, ckpt.state)
            return self.load_training({k: v for k, v in ckpt.state.items() if k not in IN_SHARDS})
        self.model.load_state_dict(ckpt.model)
        return self.load_training(ckpt.state)

    def beside_shards(self, last_loss: float | None) -> dict[str, Any]:
        """A sharded checkpoint's training state: all but what its shards hold."""
        return {k: v for k, v in self.training(last_loss).items() if k not in IN_SHARDS}

    # ---- a peer's state (torchft) ------------------------------------------
    def for_peer(self, last_loss: float | None) -> dict[str, Any]:
        # A sharded model's peer holds the same slices (the same rank of another replica group).
        return local_tree({"model": self.model.state_dict(), "training": self.training(last_loss)})

    def from_peer(self, state: dict[str, Any]) -> float | None:
        if not self.sharded:
            self.model.load_state_dict(state["model"])
            return self.load_training(state["training"])
        # In place into this rank's slices: the weights, AdamW's moments, then the rest.
        training = state["training"]
        with torch.no_grad():
            for name, t in self.model.state_dict().items():
                local(t).copy_(state["model"][name])
            mine = self.optimizer.state_dict()["state"]
            for i, entry in training["optimizer"]["state"].items():
                for key, value in entry.items():
                    if isinstance(value, torch.Tensor) and i in mine and key in mine[i]:
                        local(mine[i][key]).copy_(value)
        return self.load_training({k: v for k, v in training.items() if k != "optimizer"})

    # ---- what it is --------------------------------------------------------
    def rank_bytes(self) -> dict[str, int]:
        """Bytes this rank holds of the training state: parameters, their gradients (allocated
        every backward pass, as large as the parameters), AdamW's state and the outer step's
        anchor and momentum. Sizes only, never the values: safe to read from another thread."""
        size = lambda t: local(t).numel() * t.element_size()  # noqa: E731
        param_bytes = sum(size(p) for p in list(self.model.parameters()))
        optim = 0
        for entry in [dict(e) for e in list(self.optimizer.state.values())]:  # copies: the loop may add some
            optim += sum(size(v) for v in entry.values() if isinstance(v, torch.Tensor))
        outer = sum(t.numel() * t.element_size() for t in [*self.outer.anchor, *getattr(self.outer, "buf", [])])
        return {"param_bytes": param_bytes, "grad_bytes": param_bytes, "optimizer_bytes": optim,
                "outer_bytes": outer}

    def local_digest(self) -> str:
        """A digest of the bytes of the parameters this rank holds: equal digests on two ranks =
        equal weights (a sharded model: equal slices)."""
        import hashlib

        h = hashlib.sha256()
        for t in self.model.state_dict().values():
            h.update(local(t).detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def whole_digest(self, is_main: bool) -> str | None:
        """A digest of the whole model whatever its sharding (a collective when sharded: every rank
        calls it; rank 0 gets the digest, the others None)."""
        whole = whole_weights(self.model)
        return weights_digest(whole) if is_main else None
