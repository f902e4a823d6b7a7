"""The ``pairs`` corpus: the user's own (query, document) pairs.

``twotower.pairs`` lists files, directories and glob patterns, found as
daemon/data/text/corpus.py finds a text corpus (the same walk, bounds and regular-file
checks) except that only ``.jsonl`` and ``.parquet`` files are pairs: a directory walk
takes those and leaves other files alone; a file or a glob match of another suffix is an
error. A ``.jsonl`` line is one JSON object, a ``.parquet`` row one row, each with:

- ``query``: a non-empty string;
- ``document``: a non-empty string;
- ``negatives`` (optional): a list of strings, documents that do not answer the query;
- ``group`` (optional): a string or an integer; pairs of one group are held out together.

The files are untrusted input: every problem is one config error line naming the file
and the line or row (exit 2), and every read is bounded before it happens (a line or a
text at most MAX_DOCUMENT_BYTES, a parquet row group at most MAX_ROW_GROUP_BYTES of
text once decoded and MAX_ROW_GROUP_ROWS rows and values).
"""

from __future__ import annotations

from collections.abc import Iterator

from daemon.data.pairs.parquet import parquet_pairs
from daemon.data.pairs.rows import make_pair
from daemon.data.pairs.split import Pair
from daemon.data.text.corpus import (
    Source,
    corpus_error,
    find,
    json_rows,
)

PAIR_SUFFIXES = (".jsonl", ".parquet")
ORIGIN = "twotower.pairs"


def discover_pairs(entries: list[str], origin: str = ORIGIN) -> list[Source]:
    """The pair files in reading order (entries as listed, files sorted by path), each once,
    or ConfigError for a missing path, a file of another suffix, one that is not a regular
    file, too many files or names walked, or no file at all. Stats the files; opens none."""
    if not entries:
        raise corpus_error("names no file; list .jsonl or .parquet files, directories or patterns", entries, origin)
    sources = find(entries, origin, PAIR_SUFFIXES)
    if not sources:
        raise corpus_error(f"empty: no {' or '.join(PAIR_SUFFIXES)} file found", entries, origin)
    return sources


def _jsonl(source: Source) -> Iterator[Pair]:
    for lineno, row in json_rows(source):
        where = f"line {lineno} of {source.path}"
        if not isinstance(row, dict):
            raise corpus_error(f"{where} is not a JSON object", type(row).__name__, source.origin)
        yield make_pair(row, where, source)


def read_pairs(sources: list[Source]) -> Iterator[Pair]:
    """Every pair of the files, in corpus order."""
    for source in sources:
        yield from parquet_pairs(source) if source.path.suffix == ".parquet" else _jsonl(source)


def load_pairs(entries: list[str], origin: str = ORIGIN) -> list[Pair]:
    """``twotower.pairs`` read whole: discover_pairs, then read_pairs."""
    return list(read_pairs(discover_pairs(entries, origin)))
