"""What the two-tower task asks of the generated corpus (plain data)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GeneratedSpec:
    num_docs: int
    eval_queries: int
    dim: int  # input feature width
    cluster_size: int  # near-duplicate documents per cluster
    seed: int
