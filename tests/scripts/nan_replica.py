"""`minerd` whose torchft outer step contributes NaN pseudo-gradients: a broken or hostile
replica group with the honest group's token and training config, for tests/test_ft.py."""

from __future__ import annotations

import sys

import torch

from daemon.cli import main
from daemon.sync.torchft.outer import FtOuterOptimizer


def poisoned(self: FtOuterOptimizer) -> list[torch.Tensor]:
    return [torch.full_like(a, float("nan")) for a in self.anchor]


FtOuterOptimizer.pseudo_gradient = poisoned  # type: ignore[method-assign]

if __name__ == "__main__":
    main(sys.argv[1:])
