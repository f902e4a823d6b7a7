"""Putting the bundle together and writing it, for ``minerd bundle``.

``build_bundle`` reads the logs, asks the running miner, writes the header and the six sections in
their fixed order (``SECTIONS``), then scrubs secrets from the whole text; ``write_bundle`` writes
the file atomically (``daemon/atomic.py``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.atomic import write_text
from daemon.bundle.logs import LogSources, gather_logs
from daemon.bundle.miner_api import api_base_url, fetch_json
from daemon.bundle.redact import known_secrets, scrub
from daemon.bundle.sections import (
    section_config,
    section_diagnostics,
    section_problems,
    section_steps,
    section_uploads,
    section_versions,
)
from daemon.config import Config

SECTIONS = (
    "1. GPU diagnostics",
    "2. Last training steps",
    "3. Recent warnings and errors",
    "4. Upload history",
    "5. Configuration (secrets masked)",
    "6. Versions",
)


def build_bundle(
    cfg: Config,
    *,
    config_problems: Sequence[str] = (),
    config_origin: str = "",
    log_files: Sequence[str] = (),
    url: str | None = None,
    default_log_places: bool = True,
) -> tuple[str, LogSources]:
    logs = gather_logs(log_files, cfg.state_dir, use_default_places=default_log_places)
    api = url.rstrip("/") if url else api_base_url(cfg)
    live: dict[str, Any] = {}
    if api:
        for route in ("diagnostics", "status"):
            body, err = fetch_json(f"{api}/{route}")
            if body is not None:
                live[route] = body
            else:
                live[f"{route}_error"] = err
    else:
        live["diagnostics_error"] = "api disabled or api.port=0 in this config: pass --url"

    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = [
        f"# minerd support bundle ({now})",
        "",
        f"minerd {__version__}; state_dir {cfg.state_dir.resolve()}; API {api or 'n/a'} "
        f"({'answered' if 'status' in live else 'not reachable: ' + str(live.get('status_error', 'no address'))}).",
        "",
        "Log sources read:",
        *(
            [f"- {s}" for s in logs.read]
            or [
                "- none: pass --log FILE (pm2: ~/.pm2/logs/distributed-training-"
                "miner-error.log; systemd: journalctl -u minerd > FILE)"
            ]
        ),
        "",
        f"Looked for and not found: {', '.join(logs.missing) if logs.missing else 'nothing'}.",
        "",
        "Secrets (api.token, credentials) are masked. Read this file before you share it.",
    ]
    bodies = (
        section_diagnostics(cfg, logs, api, live),
        section_steps(logs, live),
        section_problems(logs),
        section_uploads(cfg, logs, live),
        section_config(cfg, config_problems, config_origin),
        section_versions(),
    )
    for title, body in zip(SECTIONS, bodies, strict=True):
        out += ["", f"## {title}", "", *body]
    text = "\n".join(out) + "\n"
    return scrub(text, known_secrets(cfg)), logs


def default_out_path() -> Path:
    return Path(f"minerd-bundle-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}.md")


def write_bundle(path: Path, text: str) -> None:
    write_text(path, text)
