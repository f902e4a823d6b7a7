"""Epoch shuffling without RandomSampler's per-index cost.

One permutation per epoch, seeded by (seed, epoch), and each batch is one
slice of it: the caller gathers a batch with a single tensor index. The
permutation is the same on every rank; each global batch is cut into
``world_size`` contiguous shares, so ranks see disjoint samples and together
cover the epoch. A position (epoch, batch) is all that resuming needs.
"""

from __future__ import annotations

import torch


class EpochSampler:
    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self._global_batch = batch_size * world_size
        self._epoch: int | None = None
        self._perm = torch.empty(0, dtype=torch.long)

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_items, self._global_batch)
        return full if self.drop_last or rest < self.world_size else full + 1

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_items, generator=gen)
            self._epoch = epoch
        return self._perm

    def batch(self, epoch: int, index: int) -> torch.Tensor:
        """Item indices of this rank's share of batch ``index`` of ``epoch``."""
        perm = self.permutation(epoch)
        start = index * self._global_batch
        chunk = perm[start : start + self._global_batch]
        share = len(chunk) // self.world_size
        return chunk[self.rank * share : (self.rank + 1) * share]
