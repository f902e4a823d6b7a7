"""Text as training data: a prepared dataset (token shards and their index, see
daemon/data/prepared/), named, or made from a corpus of files with a tokenizer trained on it
(or named).

The language model reads it; a second text task would too, with its own section
(``TextSpec.section``): the tokenizer is kept in ``<state_dir>/<section>/`` and the corpus
prepared into ``<state_dir>/data/<section>-dataset/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.config import ConfigError, problem
from daemon.data.text.corpus import discover
from daemon.data.text.spec import TextSpec
from daemon.plugin.entries import DataEntry

if TYPE_CHECKING:
    from daemon.plugin.parts import BuildContext


def check(spec: TextSpec) -> list[str]:
    """The corpus's files are there, regular files of a kind it reads, text files within the
    per-document cap, and not too many (each file is stat'ed; none is opened). A named
    dataset replaces the corpus: a local one must be a folder holding an index."""
    if spec.dataset:
        where = spec.key("dataset")
        if spec.corpus:
            return [problem(where, f"replaces {spec.key('corpus')}: name one of them", spec.dataset)]
        if spec.dataset.startswith("s3://"):
            bucket = spec.dataset[len("s3://"):].partition("/")[0]
            return [] if bucket else [problem(where, "names no bucket", spec.dataset)]
        if not (Path(spec.dataset).expanduser() / "index.json").is_file():
            return [problem(where, "holds no index.json: not a prepared dataset (see `minerd data prepare`)",
                            spec.dataset)]
        return []
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
    summary="a prepared token dataset (local or s3://), or text files prepared into one at the first start",
    build=build,
    check=check,
)

__all__ = ["ENTRY", "TextSpec"]
