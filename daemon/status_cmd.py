"""``minerd status [--url URL] [--json]``: read ``/status`` of a running miner.

urllib, not httpx: httpx is a development dependency only. Exit codes: 0
printed, 1 unreachable, 2 not a usable URL (one line on stderr, no traceback).
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any, TextIO

from daemon.urls import http_url_problem

DEFAULT_URL = "http://127.0.0.1:9108"


def status_url(url: str) -> str:
    """Accepts the base URL (``http://host:9108``), ``host:port`` or the full ``.../status``."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    return url if url.endswith("/status") else url + "/status"


def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """The /status object; raises OSError (URLError) or ValueError with a one-line reason."""
    target = status_url(url)
    req = urllib.request.Request(target, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        raise ValueError(f"{target} answered HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        raise OSError(f"cannot reach {target}: {exc.reason}") from None
    except (TimeoutError, OSError) as exc:  # timeouts and resets after the connection opened
        raise OSError(f"cannot reach {target}: {exc}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise ValueError(f"{target} did not answer JSON (is this a minerd API?)") from None
    if not isinstance(data, dict) or "phase" not in data:
        raise ValueError(f"{target} answered JSON that is not a minerd status")
    return data


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, int | float) and not isinstance(value, bool) else "n/a"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "n/a"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def _section_line(name: str, section: Any) -> str:
    if section is None:
        return f"{name}: off"
    if not isinstance(section, dict):
        return f"{name}: {section}"
    parts = []
    for key, value in section.items():
        if isinstance(value, dict | list):
            value = json.dumps(value, separators=(",", ":"))
        parts.append(f"{key}={value}")
    return f"{name}: " + (" ".join(parts) if parts else "-")


def _eval_line(s: dict[str, Any]) -> str:
    ev = s.get("eval") or {}
    if not isinstance(ev, dict) or not ev:
        return "eval: none yet"
    when = f" @ step {s.get('eval_global_step')}" if s.get("eval_global_step") is not None else ""
    return f"eval{when}: " + "  ".join(f"{k} {_num(v, '.4g')}" for k, v in ev.items())


def render_summary(s: dict[str, Any]) -> list[str]:
    phase = s.get("phase", "?")
    state = "ready" if s.get("ready") else "not ready"
    if s.get("paused"):
        state += ", paused"
    if s.get("stalled"):
        state += ", STALLED"
    lines = [
        f"minerd {s.get('version', '?')}  task={s.get('task', '?')}  device={s.get('device', '?')}  "
        f"rank {s.get('rank', '?')}/{s.get('world_size', '?')}",
        f"phase: {phase} ({state})  uptime {_duration(s.get('uptime_seconds'))}  "
        f"last progress {_duration(s.get('progress_age_seconds'))} ago",
        f"progress: outer {s.get('outer_step', '?')}  inner {s.get('inner_step', '?')}  "
        f"global {s.get('global_step', '?')}  epoch {s.get('epoch', '?')}",
        f"last step: {_num(s.get('last_step_seconds'), '.2f')}s  loss {_num(s.get('loss'), '.4f')}  "
        f"lr {_num(s.get('learning_rate'), '.8f')}  samples/s {_num(s.get('samples_per_second'), '.1f')}",
        _eval_line(s),
    ]
    if s.get("tokens_per_second") is not None:
        lines.append(f"throughput: tokens/s {_num(s.get('tokens_per_second'), '.0f')}  "
                     f"tokens {s.get('tokens_total', '?')}  mfu {_num(s.get('mfu'), '.3f')}")
    # The parts' sections the miner lists (older miners: the three it always had); upload always.
    listed = s.get("sections")
    names = [str(n) for n in listed] if isinstance(listed, list) else ["mining", "embeddings"]
    lines += [_section_line(name, s.get(name)) for name in ["upload", *(n for n in names if n != "upload")]]
    return lines


def run_status(
    url: str = DEFAULT_URL,
    as_json: bool = False,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    timeout: float = 5.0,
) -> int:
    """What ``minerd status`` does; returns the exit code."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    why = http_url_problem(status_url(url))
    if why is not None:
        err.write(f"minerd status: --url {why} (got {url!r})\n")
        return 2
    try:
        data = fetch_status(url, timeout=timeout)
    except (OSError, ValueError) as exc:
        err.write(f"minerd status: {exc}\n")
        return 1
    if as_json:
        out.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        out.write("\n".join(render_summary(data)) + "\n")
    return 0
