"""The replica groups' shared secret (``ft.token_file``): checked at validate, read at start."""

from __future__ import annotations

import os
import stat

from daemon.config import ConfigError, problem

MIN_TOKEN_BYTES = 16
MAX_TOKEN_BYTES = 4096


def token_problem(path: str) -> str | None:
    """Why ``ft.token_file`` cannot serve as the group's secret (read-only checks), or None."""
    if not path:
        return ("is required with ft.enabled: replica groups prove a shared secret to each other "
                "(a file of 16 to 4096 bytes, the same on every group)")
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode) or not MIN_TOKEN_BYTES <= st.st_size <= MAX_TOKEN_BYTES + 2:
        return f"must be a regular file of {MIN_TOKEN_BYTES} to {MAX_TOKEN_BYTES} bytes"
    return None


def read_token(path: str) -> bytes:
    why = token_problem(path)
    if why is None:
        with open(path, "rb") as fh:
            key = fh.read(MAX_TOKEN_BYTES + 3).rstrip(b"\r\n")
        if MIN_TOKEN_BYTES <= len(key) <= MAX_TOKEN_BYTES:
            return key
        why = f"must hold {MIN_TOKEN_BYTES} to {MAX_TOKEN_BYTES} bytes"
    raise ConfigError([problem("ft.token_file", why, path)])
