"""A generated retrieval corpus: clusters of near-duplicate documents and noisy queries,
deterministic from its spec, for the two-tower task's benchmarks and tests."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from daemon.data.generated.spec import GeneratedSpec
from daemon.plugin.entries import DataEntry

if TYPE_CHECKING:
    from daemon.plugin.parts import BuildContext


def build(ctx: BuildContext, spec: GeneratedSpec) -> Any:
    from daemon.data.generated.corpus import build as build_corpus

    return build_corpus(ctx, spec)


ENTRY = DataEntry(
    name="generated",
    summary="a generated corpus of near-duplicate document clusters and noisy queries (written once)",
    build=build,
)

__all__ = ["ENTRY", "GeneratedSpec"]
