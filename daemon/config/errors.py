"""Config problems, one line each: ``config error: <key.path>: <what is wrong> (got <value>)``.

The value shown is cut to a line's worth (a value can be megabytes of text) and
masked for secret keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from daemon.config.secrets import is_secret_key
from daemon.urls import MASK

SHOWN_CHARS = 120


class ConfigError(Exception):
    """Every problem found, one formatted line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems

    def __reduce__(self) -> tuple[type[ConfigError], tuple[list[str]]]:
        # Raised in a worker process (tokenising a corpus), it crosses back whole.
        return (ConfigError, (self.problems,))


def problem(path: str, what: str, value: Any, secret: bool = False) -> str:
    if (secret or is_secret_key(path)) and value is not None:
        value = MASK
    return f"config error: {path}: {what} (got {show(value)})"


def show(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    text = repr(value) if isinstance(value, str) else str(value)
    if len(text) > SHOWN_CHARS:
        return f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"
    return text
