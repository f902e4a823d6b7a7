"""``minerd bundle [--out FILE]``: one file with what a support request needs.

The bundle is a single Markdown file, not an archive: users paste or attach it in Discord or an
issue, where a text file previews and a .tar.gz does not; they can read it (and see that no secret
is in it) before sharing; everything in it is text, and each section is bounded (the last lines of
the logs, not the logs), so it stays small. Sections, always present and always in this order:

1. GPU diagnostics: this machine's block (``diagnostics.collect``/``render``), the CUDA test, the
   block the miner logged at start-up, ``nvidia-smi``, and a running miner's ``/diagnostics``.
2. Last training steps: the last ``Outer Step:`` lines from the miner's logs.
3. Recent warnings and errors from the same logs (tracebacks included).
4. Upload history: the target's ``LATEST``, its revisions with their ``metadata.json``, the
   upload lines of the log and the running miner's upload state.
5. Configuration with secrets masked (``Config.public_dict()``).
6. Versions: Python, platform, minerd, torch, CUDA, cuDNN, faiss and the libraries around them.

Logs: minerd logs to stderr, so under pm2 its lines land in
``$PM2_HOME/logs/distributed-training-miner-error.log`` (pm2 turns ``_`` into ``-`` in file names;
``PM2_HOME`` defaults to ``~/.pm2``); under systemd they are in the journal (``journalctl -u minerd``).
Both are looked for, plus ``<state_dir>/logs/*.log`` and any ``--log FILE``; the bundle says which
sources it read. Only the tail of each file is read.

Secrets: the API token is masked in the config, and as a last step every known secret value (the
token, AWS credentials from the environment) and every ``Bearer``/``password=``-style value is
replaced in the whole text, logs included. The file is written atomically (``daemon/atomic.py``).

The package, one module per job:

- ``logs``: where the logs are, reading their tails, parsing and picking the lines each section shows.
- ``miner_api``: asking a running miner's API for ``/diagnostics`` and ``/status``.
- ``sections``: the body of each of the six sections.
- ``redact``: what counts as a secret and masking it.
- ``document``: the header and sections put together, scrubbed, and written.
"""

from __future__ import annotations

from daemon.bundle.document import SECTIONS, build_bundle, default_out_path, write_bundle
from daemon.bundle.logs import (
    DIAG_LINES,
    MAX_LINE,
    PM2_APPS,
    PROBLEM_LINES,
    STEP_LINES,
    SYSTEMD_UNIT,
    TAIL_BYTES,
    UPLOAD_LINES,
    LogLine,
    LogSources,
    diagnostics_block,
    gather_logs,
    parse_line,
    pm2_log_paths,
    problem_lines,
    read_tail,
    step_lines,
    upload_lines,
)
from daemon.bundle.miner_api import API_TIMEOUT, api_base_url, fetch_json
from daemon.bundle.redact import MASK, known_secrets, scrub
from daemon.bundle.sections import (
    MAX_REVISIONS,
    section_config,
    section_diagnostics,
    section_problems,
    section_steps,
    section_uploads,
    section_versions,
)

__all__ = [
    "API_TIMEOUT",
    "DIAG_LINES",
    "MASK",
    "MAX_LINE",
    "MAX_REVISIONS",
    "PM2_APPS",
    "PROBLEM_LINES",
    "SECTIONS",
    "STEP_LINES",
    "SYSTEMD_UNIT",
    "TAIL_BYTES",
    "UPLOAD_LINES",
    "LogLine",
    "LogSources",
    "api_base_url",
    "build_bundle",
    "default_out_path",
    "diagnostics_block",
    "fetch_json",
    "gather_logs",
    "known_secrets",
    "parse_line",
    "pm2_log_paths",
    "problem_lines",
    "read_tail",
    "scrub",
    "section_config",
    "section_diagnostics",
    "section_problems",
    "section_steps",
    "section_uploads",
    "section_versions",
    "step_lines",
    "upload_lines",
    "write_bundle",
]
