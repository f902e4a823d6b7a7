"""sampler: one epoch of batches over 900k items.

- shuffled_over_sequential: our shuffled epoch (one permutation, one gather per
  batch) over the same loop on the identity permutation (goal <= 1.05).
- speedup_over_dataloader: DataLoader(TensorDataset, shuffle=True) epoch time
  over ours (goal >= 20): RandomSampler yields indices one at a time and the
  default collate stacks items one by one (users saw 140x slowdowns from it).
- training_shuffled_over_sequential: the same comparison inside the real
  two-tower trainer over a 900k-document corpus (the question users ask:
  does shuffling slow training?). The bare gather loop cannot reach 1.05 on any
  machine: a shuffled batch reads 1024 scattered rows, each a DRAM miss, where
  the identity permutation streams one contiguous block; inside a training step
  that difference is a fraction of a percent.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from bench._common import interleaved, result
from daemon.engine.sampler import EpochSampler
from daemon.logsetup import configure_logging
from daemon.run.local import cpu_run

N_ITEMS, WIDTH, BATCH = 900_000, 16, 1024


def main(quick: bool) -> None:
    torch.set_num_threads(1)
    ratio_wide, _, _ = epoch_ratio(128, quick)  # the two-tower corpus's row width
    ratio, t_shuf, t_seq = epoch_ratio(WIDTH, quick)
    data = torch.randn(N_ITEMS, WIDTH)
    targets = torch.randn(N_ITEMS, WIDTH)
    sampler = EpochSampler(N_ITEMS, BATCH, seed=1)
    epoch = [0]

    def shuffled() -> None:
        epoch[0] += 1
        for i in range(sampler.batches_per_epoch):
            idx = sampler.batch(epoch[0], i)
            data.index_select(0, idx).sum()
            targets.index_select(0, idx).sum()

    def dataloader() -> None:
        for x, y in DataLoader(TensorDataset(data, targets), batch_size=BATCH, shuffle=True, drop_last=True):
            x.sum()
            y.sum()

    t_ours, t_dl = interleaved(shuffled, dataloader, 1 if quick else 3)
    print(f"{'loop (width ' + str(WIDTH) + ')':<32}{'seconds/epoch':>14}")
    for name, t in (("ours, shuffled", t_shuf), ("ours, identity permutation", t_seq),
                    ("ours, shuffled (vs DataLoader)", t_ours), ("DataLoader(shuffle=True)", t_dl)):
        print(f"{name:<32}{t:>14.3f}")
    print(f"shuffled/sequential at width 128: {ratio_wide:.3f}")
    t_train_shuf, t_train_seq = training_epochs(quick)
    print(f"training steps: shuffled {t_train_shuf:.3f} s, identity permutation {t_train_seq:.3f} s")
    result("sampler", shuffled_over_sequential=ratio, speedup_over_dataloader=t_dl / t_ours,
           shuffled_over_sequential_w128=ratio_wide,
           training_shuffled_over_sequential=t_train_shuf / t_train_seq)


def epoch_ratio(width: int, quick: bool) -> tuple[float, float, float]:
    """Shuffled over identity-permutation epoch time, same gathers, same loop."""
    data = torch.randn(N_ITEMS, width)
    targets = torch.randn(N_ITEMS, width)
    sampler = EpochSampler(N_ITEMS, BATCH, seed=1)
    identity = torch.arange(N_ITEMS)
    epoch = [0]

    def shuffled() -> None:
        epoch[0] += 1  # a new permutation each epoch, as in training
        for i in range(sampler.batches_per_epoch):
            idx = sampler.batch(epoch[0], i)
            data.index_select(0, idx).sum()
            targets.index_select(0, idx).sum()

    def sequential() -> None:
        for i in range(sampler.batches_per_epoch):
            idx = identity[i * BATCH : (i + 1) * BATCH]
            data.index_select(0, idx).sum()
            targets.index_select(0, idx).sum()

    rounds = 3 if quick else 7
    t_shuf, t_seq = interleaved(shuffled, sequential, rounds)
    return t_shuf / t_seq, t_shuf, t_seq



def training_epochs(quick: bool) -> tuple[float, float]:
    """Inner steps of the default two-tower job on 900k documents: shuffled vs identity order.

    Both variants run the same number of steps from the same parameters'
    trajectory; only the sampler's permutation differs.
    """
    tmp = Path(tempfile.mkdtemp(prefix="bench-sampler-"))
    configure_logging("json", "warning")  # step lines would drown the table
    built = cpu_run(["train.task=twotower", "twotower.corpus=synthetic", f"paths.state_dir={tmp}",
                     f"twotower.num_docs={N_ITEMS}",
                     "twotower.eval_queries=100", "mining.enabled=false", "upload.enabled=false",
                     "embeddings.enabled=false"]).run
    trainer, sampler = built.trainer, built.sampler
    assert isinstance(sampler, EpochSampler)  # the two-tower task's
    shuffled_perm = sampler.permutation
    identity = torch.arange(sampler.num_items)
    steps = 10 if quick else 30

    def run(perm: Callable[[int], torch.Tensor]) -> None:
        sampler.permutation = perm  # type: ignore[method-assign, assignment]
        for _ in range(steps):
            trainer.inner_step()

    run(shuffled_perm)  # warm-up
    return interleaved(lambda: run(shuffled_perm), lambda: run(lambda epoch: identity), 4 if quick else 8)
