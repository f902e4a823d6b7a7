"""Text as training data: a corpus of files, a tokenizer trained on it (or named), and the
token cache both splits are read from (memory maps of flat token ids).

The language model reads it; a second text task would too, with its own section
(``TextSpec.section``): the tokenizer is kept in ``<state_dir>/<section>/`` and the cache
in ``<state_dir>/data/<section>-tokens-<digest>/``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from daemon.config import ConfigError
from daemon.data.text.corpus import discover
from daemon.data.text.spec import TextSpec
from daemon.plugin.entries import DataEntry

if TYPE_CHECKING:
    from daemon.plugin.parts import BuildContext


def check(spec: TextSpec) -> list[str]:
    """The corpus's files are there, regular files of a kind it reads, text files within the
    per-document cap, and not too many (each file is stat'ed; none is opened)."""
    try:
        discover(list(spec.corpus), spec.key("corpus"))
    except ConfigError as exc:
        return exc.problems
    return []


def build(ctx: BuildContext, spec: TextSpec) -> Any:
    from daemon.data.text.build import build as build_text

    return build_text(ctx, spec)


ENTRY = DataEntry(
    name="text",
    summary="text files tokenised once into a cache (a BPE trained on them, or a named tokenizer)",
    build=build,
    check=check,
)

__all__ = ["ENTRY", "TextSpec"]
