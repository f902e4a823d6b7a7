"""A named tokenizer, checked before it is used: what it is, and the token ids it can produce.

A model embeds token ``i`` with row ``i`` of its input embedding, so every id a tokenizer
can produce must be below the model's embedding rows: a larger one is an IndexError on a
CPU and a device-side assert on a GPU, at the first batch that holds it. A tokenizer's
largest id is not ``len(tokenizer) - 1`` when its vocabulary has holes (``{"a": 0,
"b": 5000}``) or its added tokens were given ids past the model's rows, so the check is
on the largest id itself (over the vocabulary and the added tokens).

``minerd config validate`` runs these checks; importing this module imports no model
library (``tokenizers`` is imported where a tokenizer file is read).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# The largest tokenizer.json or tokenizer_config.json read: those of the largest public
# vocabularies (262k tokens) are about 35 MB; a bigger file is not a tokenizer.
MAX_TOKENIZER_BYTES = 256 << 20


def _regular_size(path: Path) -> tuple[bool, int]:
    st = os.stat(path)
    return stat.S_ISREG(st.st_mode), st.st_size


def read_json(path: Path) -> Any:
    """A small JSON file of a tokenizer or model directory, or ValueError saying why not."""
    try:
        regular, size = _regular_size(path)
        if not regular:
            raise ValueError(f"{path.name} is not a regular file")
        if size > MAX_TOKENIZER_BYTES:
            raise ValueError(f"{path.name} is {size >> 20} MiB, more than a tokenizer's {MAX_TOKENIZER_BYTES >> 20}")
        return json.loads(path.read_bytes())
    except RecursionError:
        raise ValueError(f"{path.name} nests deeper than the JSON reader follows") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path.name}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path.name} is not JSON ({exc})") from None


def named_problem(path: str) -> str | None:
    """Why ``path`` cannot be loaded as a tokenizer (a ``tokenizer.json`` or a tokenizer
    directory), or None. A directory whose ``tokenizer_config.json`` names code to run
    (``auto_map``) is refused: nothing from a directory is ever executed."""
    p = Path(path).expanduser()
    try:
        st = os.stat(p)
    except OSError as exc:
        return "no such file or directory" if not os.path.lexists(p) else f"cannot read it: {exc.strerror or exc}"
    if stat.S_ISREG(st.st_mode):
        if st.st_size > MAX_TOKENIZER_BYTES:
            return f"is {st.st_size >> 20} MiB, more than a tokenizer's {MAX_TOKENIZER_BYTES >> 20} MiB"
        return None
    if not stat.S_ISDIR(st.st_mode):
        return "is neither a regular file (a tokenizer.json) nor a directory"
    config = p / TOKENIZER_CONFIG
    if not os.path.lexists(config):
        return None
    try:
        data = read_json(config)
    except ValueError as exc:
        return f"cannot load a tokenizer from it: {exc}"
    if isinstance(data, dict) and data.get("auto_map"):
        return (f"its {TOKENIZER_CONFIG} names code to run (auto_map); minerd never runs code from a directory: "
                f"use a tokenizer transformers has built in (a tokenizer.json)")
    return None


def file_ids(path: str) -> tuple[int, int] | None:
    """(the largest token id, the number of tokens) of the ``tokenizer.json`` that ``path``
    is or holds, as the tokenizers library loads it; None for a directory without one.
    ValueError when it does not load."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / TOKENIZER_FILE
        if not p.is_file():
            return None
    regular, size = _regular_size(p)
    if not regular or size > MAX_TOKENIZER_BYTES:
        raise ValueError(f"{p.name} is not a regular file of at most {MAX_TOKENIZER_BYTES >> 20} MiB")
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as exc:  # the tokenizers library raises a plain Exception for a bad file
        raise ValueError(str(exc)) from None
    ids = tok.get_vocab(with_added_tokens=True).values()
    return max(ids, default=-1), tok.get_vocab_size(with_added_tokens=True)


def model_rows(model_dir: str) -> int | None:
    """The input-embedding rows of the model in ``model_dir`` (its config.json's
    ``vocab_size``), or None when its config does not say."""
    try:
        config = read_json(Path(model_dir).expanduser() / "config.json")
    except ValueError:
        return None
    value = config.get("vocab_size") if isinstance(config, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def ids_problem(largest: int, rows: int, rows_from: str) -> str | None:
    """The config error text when a tokenizer's largest id is not below the model's rows."""
    if largest < rows:
        return None
    return (f"the tokenizer can produce token id {largest}, but the model has {rows} embedding rows "
            f"({rows_from}): every id must be below {rows}")


def model_tokenizer_problem(model_dir: str, key: str) -> str | None:
    """Why the tokenizer of the model directory ``model_dir`` (named by config key ``key``)
    cannot feed its model: it does not load, or it can produce an id past the rows its
    config.json gives. None when it can, or when either is not known without loading."""
    if why := named_problem(model_dir):
        return why
    try:
        ids = file_ids(model_dir)
    except ValueError as exc:
        return f"cannot load a tokenizer from it: {str(exc)[:200]}"
    rows = model_rows(model_dir)
    if ids is None or rows is None:
        return None
    return ids_problem(ids[0], rows, f"the vocab_size of {key}'s config.json")
