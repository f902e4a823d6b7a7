"""Masking secrets in the bundle's text, for ``minerd bundle``.

The API token is already masked in the config section; as a last step every known secret value (the
token, AWS credentials from the environment) and every ``Bearer``/``password=``-style value is
replaced in the whole text, logs included, and the sections mask credentials in URLs. Kept in one
place so what counts as a secret is defined once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from daemon.config import Config
from daemon.config.secrets import SECRET_KEY_WORDS

MASK = "********"

# A secret-looking key is one of the words, whole or as a part of a name between separators
# (R2_SECRET_KEY), never the start of a longer word (secretary, author).
_SECRET_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)[^\s\"',}]+"),
    re.compile(
        rf"(?i)((?<![A-Za-z0-9])(?:[A-Za-z0-9]+[_.-])*(?:{SECRET_KEY_WORDS})(?:[_.-][A-Za-z0-9]+)*[\"']?\s*[:=]\s*[\"']?)"
        r"(?!null\b|None\b|\*|Bearer\b|Basic\b)[^\s\"',}]+"
    ),
    # Credentials in URLs, to the last "@" of the URL: a password may hold "/" or "@".
    re.compile(r"(://[^/\s:@]+:)\S*(@)"),
    re.compile(r"(://)[^/\s:@]+(@)"),  # a bare token as the user part
)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "MINERD_API__TOKEN")


def _mask_url(url: str) -> str:
    return re.sub(r"(://)[^/@\s]+@", r"\1" + MASK + "@", url)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Every known secret value and every token/password-looking value, replaced by the mask."""
    for value in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(value, MASK)
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + MASK + (m.group(2) if m.lastindex == 2 else ""), text)
    return text


def known_secrets(cfg: Config, environ: dict[str, str] | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    out = [env.get(name, "") for name in _SECRET_ENV]
    if cfg.api.token is not None:
        out.append(cfg.api.token.get_secret_value())
    return out
