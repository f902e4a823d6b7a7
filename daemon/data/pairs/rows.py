"""One pair from one ``.jsonl`` line or ``.parquet`` row: the fields checked, or one line
saying which line or row of which file is wrong and how."""

from __future__ import annotations

from typing import Any

from daemon.config import ConfigError
from daemon.data.pairs.split import Pair
from daemon.data.text.corpus import Source, _utf8, corpus_error


def make_pair(row: dict[str, Any], where: str, source: Source) -> Pair:
    """A pair from one line's or row's fields, or one line saying ``where`` what is wrong."""

    def error(what: str, value: object) -> ConfigError:
        return corpus_error(f"{where} {what}", value, source.origin)

    texts = {}
    for key in ("query", "document"):
        value = row.get(key)
        if not isinstance(value, str):
            raise error(f'has no "{key}" string', type(value).__name__ if key in row else sorted(row)[:5])
        if not value.strip():
            raise error(f'has an empty "{key}"', value)
        texts[key] = _utf8(value)
    negatives = row.get("negatives")
    if negatives is None:
        negatives = []
    if not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
        raise error('has "negatives" that are not a list of strings', str(negatives)[:60])
    group = row.get("group")
    # bool is an int to Python, but true/false as a group is a mistake in the data.
    if group is not None and (isinstance(group, bool) or not isinstance(group, str | int)):
        raise error('has a "group" that is neither a string nor an integer', group)
    return Pair(texts["query"], texts["document"], tuple(_utf8(n) for n in negatives),
                None if group is None else str(group))
