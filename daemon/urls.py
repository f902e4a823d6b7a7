"""URLs and host names as operators type them: checked before use, shown without credentials."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

MASK = "********"
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# scheme://userinfo@rest, the userinfo running to the last "@": a password may hold "/" or "@"
# (URL parsers then take part of it for the path or the host).
_URL_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>.*)@(?P<rest>[^@]*)$", re.DOTALL)


def redact_url(url: str) -> str:
    """``url`` without its credentials: ``user:********@host``, or ``********@host`` when the
    user part is a bare token; a URL without them is unchanged."""
    match = _URL_USERINFO.match(url)
    if match is None:
        return url
    user, sep, _ = match["userinfo"].partition(":")
    shown = f"{user}:{MASK}" if sep else MASK
    return f"{match['scheme']}{shown}@{match['rest']}"


def is_host(value: str) -> bool:
    """An IP address (v4 or v6) or a host name of dot-separated labels."""
    try:
        ipaddress.ip_address(value.strip("[]"))
        return True
    except ValueError:
        pass
    name = value[:-1] if value.endswith(".") else value
    return 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in name.split("."))


def http_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be asked over HTTP, or None when it can."""
    if any(c.isspace() or ord(c) < 32 for c in url):
        return "has spaces or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "is not a URL with a valid port"
    if parts.scheme not in ("http", "https"):
        return "is not an http:// or https:// URL"
    if not parts.hostname or not is_host(parts.hostname):
        return "has no valid host"
    del port  # read for its check only
    return None
