"""Asking a running miner's HTTP API for its ``/diagnostics`` and ``/status``, for ``minerd bundle``.

Never raises: the miner may well not be running, and the bundle must still be written.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any

from daemon.config import Config

API_TIMEOUT = 2.0


def api_base_url(cfg: Config) -> str | None:
    if not cfg.api.enabled or cfg.api.port == 0:
        return None
    host = cfg.api.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{cfg.api.port}"


def fetch_json(url: str, timeout: float = API_TIMEOUT) -> tuple[Any, str | None]:
    """(body, None) or (None, why not), never raising: the miner may well not be running."""
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers={"Accept": "application/json"}), timeout=timeout
        ) as resp:
            return json.loads(resp.read()), None
    except urllib.error.HTTPError as exc:
        return None, f"{url} answered HTTP {exc.code}"
    except urllib.error.URLError as exc:
        return None, f"{url}: {exc.reason}"
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return None, f"{url}: {exc}"
