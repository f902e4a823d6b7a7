"""The epoch sampler: one permutation per epoch, sharded, resumable."""

from __future__ import annotations

import torch

from daemon.engine.sampler import EpochSampler


class TestEpochSampler:
    """Batches are slices of a seeded permutation."""

    def test_covers_each_item_once_with_drop_last(self) -> None:
        s = EpochSampler(1000, 64, seed=3)
        seen = torch.cat([s.batch(1, i) for i in range(s.batches_per_epoch)])
        assert s.batches_per_epoch == 15 and len(seen) == 960 and len(set(seen.tolist())) == 960

    def test_without_drop_last_covers_everything(self) -> None:
        s = EpochSampler(1000, 64, seed=3, drop_last=False)
        seen = torch.cat([s.batch(1, i) for i in range(s.batches_per_epoch)])
        assert sorted(seen.tolist()) == list(range(1000))

    def test_deterministic_per_epoch_and_different_across_epochs(self) -> None:
        a, b = EpochSampler(500, 50, seed=9), EpochSampler(500, 50, seed=9)
        assert torch.equal(a.batch(2, 3), b.batch(2, 3))
        assert not torch.equal(a.permutation(2), a.permutation(3))

    def test_ranks_are_disjoint_and_together_cover_the_epoch(self) -> None:
        ranks = [EpochSampler(1024, 32, seed=1, rank=r, world_size=2) for r in range(2)]
        per_rank = [torch.cat([s.batch(1, i) for i in range(s.batches_per_epoch)]) for s in ranks]
        assert not set(per_rank[0].tolist()) & set(per_rank[1].tolist())
        assert sorted(torch.cat(per_rank).tolist()) == list(range(1024))
