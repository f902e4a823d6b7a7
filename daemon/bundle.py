"""``minerd bundle [--out FILE]``: one file with what seed 001's "Getting Help" asks users to collect.

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
"""

from __future__ import annotations

import datetime as dt
import importlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daemon import __version__
from daemon.atomic import write_text
from daemon.config import Config

PM2_APPS = ("distributed_training_miner", "distributed_training_miner_multigpu")
SYSTEMD_UNIT = "minerd"
TAIL_BYTES = 8 << 20  # of each log file
STEP_LINES = 20
PROBLEM_LINES = 30
UPLOAD_LINES = 20
DIAG_LINES = 21  # the "GPU DIAGNOSTICS" line and the 20 after it, as `grep -A 20`
MAX_LINE = 600
MAX_REVISIONS = 10
API_TIMEOUT = 2.0
MASK = "********"

SECTIONS = (
    "1. GPU diagnostics",
    "2. Last training steps",
    "3. Recent warnings and errors",
    "4. Upload history",
    "5. Configuration (secrets masked)",
    "6. Versions",
)

# pm2's log_date_format prefix ('YYYY-MM-DD HH:mm:ss.SSS Z: '), or an ISO time at the start.
_PM2_PREFIX = re.compile(r"^(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:\.\d+)?)(?: ?[+-]\d\d:?\d\d|Z)?: ")
_LEADING_TIME = re.compile(r"^(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:\.\d+)?)")
_PROBLEM_TEXT = re.compile(
    r"warn|error|exception|traceback|critical|fatal|RED FLAG|SLOW STEP|LOW GPU MEMORY|out of memory|killed",
    re.IGNORECASE,
)
_UPLOAD_TEXT = re.compile(r"UPLOAD|Successfully pushed|upload error|upload publisher", re.IGNORECASE)
_SECRET_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)[^\s\"',}]+"),
    re.compile(
        r"(?i)((?:token|secret|password|passwd|api[_-]?key|access[_-]?key)[\"']?\s*[:=]\s*[\"']?)"
        r"(?!null\b|None\b|\*)[^\s\"',}]+"
    ),
    re.compile(r"(://[^/\s:@]+:)[^@\s/]+(@)"),  # user:password@host in URLs
)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "MINERD_API__TOKEN")


# --- logs ----------------------------------------------------------------------------------------
@dataclass
class LogLine:
    source: str
    time: str  # a sortable "YYYY-MM-DD HH:MM:SS.ffffff", or "" when the line has none
    text: str  # the line without pm2's prefix
    record: dict[str, Any] | None  # the JSON log record, when the line is one

    @property
    def event(self) -> str:
        if self.record is not None:
            return str(self.record.get("event", ""))
        return self.text

    @property
    def level(self) -> str:
        return str(self.record.get("level", "")) if self.record is not None else ""

    def render(self) -> str:
        """One readable line: time, level, event, then the record's other fields as key=value."""
        if self.record is None:
            out = f"{self.time} {self.text}" if self.time and not _LEADING_TIME.match(self.text) else self.text
        else:
            extra = " ".join(
                f"{k}={_short(v)}"
                for k, v in self.record.items()
                if k not in ("event", "level", "logger", "timestamp", "line")
            )
            out = f"{self.time} [{self.level or '-'}] {self.event}" + (f" | {extra}" if extra else "")
        out = out.replace("\r", "").replace("\n", " \\n ")
        return out if len(out) <= MAX_LINE else out[: MAX_LINE - 3] + "..."


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def _norm_time(raw: str) -> str:
    raw = raw.replace("T", " ")
    if "." not in raw:
        raw += ".000000"
    head, _, frac = raw.partition(".")
    return f"{head}.{(frac + '000000')[:6]}"


def parse_line(source: str, raw: str, previous_time: str = "") -> LogLine:
    text = raw.rstrip("\r\n")
    when = ""
    m = _PM2_PREFIX.match(text)
    if m:
        when = _norm_time(m.group(1))
        text = text[m.end() :]
    record: dict[str, Any] | None = None
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and "event" in obj:
            record = obj
            ts = obj.get("timestamp")
            if isinstance(ts, str) and _LEADING_TIME.match(ts):
                when = when or _norm_time(_LEADING_TIME.match(ts).group(1))  # type: ignore[union-attr]
    if not when:
        m2 = _LEADING_TIME.match(text)
        when = _norm_time(m2.group(1)) if m2 else previous_time  # a traceback line: its error's time
    return LogLine(source, when, text, record)


def read_tail(path: Path, max_bytes: int = TAIL_BYTES) -> list[str]:
    with path.open("rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - max_bytes))
        data = fh.read()
    lines = data.decode("utf-8", "replace").splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first one is cut
    return lines


@dataclass
class LogSources:
    lines: list[LogLine] = field(default_factory=list)
    read: list[str] = field(default_factory=list)  # "path (N lines)"
    missing: list[str] = field(default_factory=list)  # places looked at that had nothing


def pm2_log_paths(environ: dict[str, str] | None = None) -> list[Path]:
    """Where pm2 writes the miner's logs by default: $PM2_HOME (or ~/.pm2)/logs/<app>-{out,error}.log,
    with the app name's non-alphanumerics turned into '-' as pm2 does (and the literal name too)."""
    env = os.environ if environ is None else environ
    home = Path(env.get("PM2_HOME") or Path(env.get("HOME") or Path.home()) / ".pm2")
    out: list[Path] = []
    for app in PM2_APPS:
        for name in dict.fromkeys((re.sub(r"[^a-zA-Z0-9]", "-", app), app)):
            out += [home / "logs" / f"{name}-out.log", home / "logs" / f"{name}-error.log"]
    return out


def _journal_lines(unit: str, lines: int = 5000) -> list[str]:
    journalctl = shutil.which("journalctl")
    if not journalctl:
        return []
    try:
        proc = subprocess.run(
            [journalctl, "-u", unit, "--no-pager", "-n", str(lines), "-o", "cat"],
            capture_output=True,
            text=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if proc.returncode != 0:
        return []
    out = [line for line in proc.stdout.splitlines() if line.strip()]
    return [] if out and out[0].startswith("-- No entries") else out


def gather_logs(
    explicit: Sequence[str], state_dir: Path, *, use_default_places: bool = True, journal: bool = True
) -> LogSources:
    found = LogSources()
    paths: list[Path] = [Path(p) for p in explicit]
    if use_default_places:
        paths += pm2_log_paths()
        logs_dir = state_dir / "logs"
        if logs_dir.is_dir():
            paths += sorted(logs_dir.glob("*.log"))
    seen: set[Path] = set()
    per_source: list[list[LogLine]] = []
    for path in paths:
        key = path.resolve() if path.exists() else path
        if key in seen:
            continue
        seen.add(key)
        if not path.is_file():
            found.missing.append(str(path))
            continue
        try:
            raw = read_tail(path)
        except OSError as exc:
            found.missing.append(f"{path} ({exc.strerror or exc})")
            continue
        per_source.append(_parse_all(str(path), raw))
        found.read.append(f"{path} ({len(raw)} lines read)")
    if journal and use_default_places:
        raw = _journal_lines(SYSTEMD_UNIT)
        where = f"journalctl -u {SYSTEMD_UNIT}"
        if raw:
            per_source.append(_parse_all(where, raw))
            found.read.append(f"{where} ({len(raw)} lines read)")
        else:
            found.missing.append(where)
    merged = [line for lines in per_source for line in lines]
    merged.sort(key=lambda line: line.time)  # stable: lines without a time keep their place
    found.lines = merged
    return found


def _parse_all(source: str, raw: Iterable[str]) -> list[LogLine]:
    out: list[LogLine] = []
    previous = ""
    for text in raw:
        if not text.strip():
            continue
        line = parse_line(source, text, previous)
        previous = line.time or previous
        out.append(line)
    return out


def step_lines(lines: Sequence[LogLine], n: int = STEP_LINES) -> list[LogLine]:
    return [line for line in lines if "Outer Step:" in line.event][-n:]


def problem_lines(lines: Sequence[LogLine], n: int = PROBLEM_LINES) -> list[tuple[LogLine, int]]:
    """The last ``n`` distinct warnings/errors, each with how often it occurred in the logs read.

    Lines that differ only in their numbers count as one (``UPLOAD BLOCKED: inner_step (4)`` and
    ``(6)``): a flood of one warning must not push the one error out of the bundle."""

    def is_problem(line: LogLine) -> bool:
        if line.record is not None:
            return line.level in ("warning", "error", "critical", "exception") or bool(_PROBLEM_TEXT.search(line.event))
        return bool(_PROBLEM_TEXT.search(line.text))

    last: dict[str, tuple[int, LogLine]] = {}
    counts: dict[str, int] = {}
    for i, line in enumerate(lines):
        if is_problem(line):
            key = re.sub(r"\d+(?:\.\d+)?", "#", line.event)
            last[key] = (i, line)
            counts[key] = counts.get(key, 0) + 1
    ordered = sorted(last.items(), key=lambda kv: kv[1][0])[-n:]
    return [(line, counts[key]) for key, (_, line) in ordered]


def upload_lines(lines: Sequence[LogLine], n: int = UPLOAD_LINES) -> list[LogLine]:
    return [line for line in lines if _UPLOAD_TEXT.search(line.event)][-n:]


def diagnostics_block(lines: Sequence[LogLine]) -> list[LogLine]:
    """The last "GPU DIAGNOSTICS" block the miner logged (the line and the 20 after it, same source)."""
    starts = [i for i, line in enumerate(lines) if "GPU DIAGNOSTICS" in line.event]
    if not starts:
        return []
    first = starts[-1]
    source = lines[first].source
    block = [line for line in lines[first:] if line.source == source][:DIAG_LINES]
    return block


# --- the running miner ---------------------------------------------------------------------------
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
    except (OSError, ValueError) as exc:
        return None, f"{url}: {exc}"


# --- sections ------------------------------------------------------------------------------------
def _fence(lines: Iterable[str], lang: str = "") -> list[str]:
    body = [line.replace("```", "'''") for line in lines]
    return [f"```{lang}", *(body or ["(nothing)"]), "```"]


def _expected_device(cfg: Config) -> str:
    import torch

    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return cfg.train.device if cfg.train.device.startswith("cuda:") else "cuda:0"


def _world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _run_tool(args: Sequence[str], timeout: float = 15) -> tuple[str | None, str]:
    """(output, how it went); None when the tool is missing."""
    exe = shutil.which(args[0])
    if exe is None:
        return None, f"{args[0]}: not found on PATH"
    try:
        proc = subprocess.run(
            [exe, *args[1:]], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{args[0]}: {exc}"
    return (proc.stdout + proc.stderr).rstrip(), f"exit {proc.returncode}"


def section_diagnostics(cfg: Config, logs: LogSources, api: str | None, live: dict[str, Any]) -> list[str]:
    import torch

    from daemon import diagnostics

    out: list[str] = []
    device = _expected_device(cfg)
    diag = diagnostics.collect(cfg, torch.device(device), _world_size())
    out += [
        f"This machine, as `minerd bundle` sees it (model device = the device `minerd run` would pick "
        f"with this config: {device}):",
        "",
    ]
    out += _fence(diagnostics.render(diag))
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    out += ["", "CUDA test:", ""]
    out += _fence([f"CUDA: {torch.cuda.is_available()}, Count: {torch.cuda.device_count()}, Device: {name}"])
    out += ["", 'Logged by the miner at its last start (`grep -A 20 "GPU DIAGNOSTICS"`):', ""]
    block = diagnostics_block(logs.lines)
    out += _fence(
        [line.event if line.record is not None else line.text for line in block]
        if block
        else ["(no GPU DIAGNOSTICS block in the logs read)"]
    )
    out += ["", f"Running miner's /diagnostics ({api or 'no API address in the config'}):", ""]
    if "diagnostics" in live:
        out += _fence(json.dumps(live["diagnostics"], indent=2).splitlines(), "json")
    else:
        out += [f"not available: {live.get('diagnostics_error', 'no API address')}"]
    smi, how = _run_tool(["nvidia-smi"])
    out += ["", f"nvidia-smi ({how}):", ""]
    out += _fence((smi or "").splitlines() if smi is not None else [how])
    return out


def section_steps(logs: LogSources, live: dict[str, Any]) -> list[str]:
    steps = step_lines(logs.lines)
    out = [f"The last {len(steps)} `Outer Step:` lines of the logs read:", ""]
    out += _fence(line.render() for line in steps)
    status = live.get("status")
    if isinstance(status, dict):
        keys = (
            "phase",
            "outer_step",
            "inner_step",
            "global_step",
            "epoch",
            "loss",
            "learning_rate",
            "last_step_seconds",
            "samples_per_second",
            "separation_margin",
            "model_on_accelerator",
            "device",
            "uptime_seconds",
        )
        out += ["", "Running miner's /status (progress fields):", ""]
        out += _fence(json.dumps({k: status[k] for k in keys if k in status}, indent=2).splitlines(), "json")
    return out


def section_problems(logs: LogSources) -> list[str]:
    problems = problem_lines(logs.lines)
    out = [
        f"The last {len(problems)} distinct warnings/errors (level warning or above, or text matching "
        "warning|error|exception|traceback|RED FLAG|SLOW STEP|LOW GPU MEMORY|out of memory), oldest "
        "first; lines differing only in numbers are shown once, at their last occurrence, with a count:",
        "",
    ]
    out += _fence((f"(x{count}) " if count > 1 else "") + line.render() for line, count in problems)
    return out


def section_uploads(cfg: Config, logs: LogSources, live: dict[str, Any]) -> list[str]:
    up = cfg.upload
    target = up.target or str(cfg.state_dir / "uploads")
    out = [
        f"upload.enabled={up.enabled}, backend={up.backend}, target={_mask_url(target)}, "
        f"min_inner_step={up.min_inner_step}, every_inner_steps={up.every_inner_steps}, "
        f"max_age_seconds={up.max_age_seconds}",
        "",
    ]
    out += _upload_target(target, up.endpoint_url, up.max_age_seconds)
    status = live.get("status")
    if isinstance(status, dict) and status.get("upload") is not None:
        out += ["", "Running miner's upload state (/status):", ""]
        out += _fence(json.dumps(status["upload"], indent=2, default=str).splitlines(), "json")
    lines = upload_lines(logs.lines)
    out += ["", f"The last {len(lines)} upload lines of the logs (UPLOAD START/OK/FAILED/BLOCKED):", ""]
    out += _fence(line.render() for line in lines)
    return out


def _upload_target(target: str, endpoint_url: str, max_age: float) -> list[str]:
    from daemon.upload.revision import read_manifest, read_pointer
    from daemon.upload.storage import StorageError, open_storage, revision_key

    if not target.startswith("s3://") and not Path(target).is_dir():
        return [f"Target {target}: does not exist (nothing uploaded yet, or another state_dir/target)."]
    try:
        storage = open_storage(target, endpoint_url)
        latest = read_pointer(storage)
        names = storage.list_revisions()
    except (StorageError, OSError, ValueError) as exc:
        return [f"Target {_mask_url(target)}: cannot read it: {exc}"]
    names = sorted(names, key=lambda n: revision_key(n) or (-1, -1))
    rows: list[str] = []
    now = dt.datetime.now(dt.UTC).timestamp()
    for name in names[-MAX_REVISIONS:][::-1]:
        try:
            meta = read_manifest(storage, name)
        except (StorageError, OSError, ValueError) as exc:
            rows.append(f"| {name} | unreadable metadata.json: {exc} | | | | |")
            continue
        if meta is None:
            rows.append(f"| {name} | no metadata.json (incomplete revision) | | | | |")
            continue
        created = meta.get("created_at_unix")
        age = f"{now - float(created):.0f}" if isinstance(created, int | float) else "?"
        size = sum(int(f.get("size", 0)) for f in (meta.get("files") or {}).values() if isinstance(f, dict))
        loss = meta.get("loss")
        rows.append(
            f"| {name}{' (LATEST)' if name == latest else ''} | {meta.get('created_at', '?')} | {age} | "
            f"{meta.get('outer_step', '?')}/{meta.get('inner_step', '?')} | "
            f"{loss if not isinstance(loss, float) else f'{loss:.4f}'} | {size} |"
        )
    out = [
        f"Target {_mask_url(storage.describe())}: LATEST = {latest or '(none)'}; "
        f"{len(names)} revision(s), newest {min(len(names), MAX_REVISIONS)} shown. Validators reject a "
        f"revision older than about {max_age:.0f} s (upload.max_age_seconds).",
        "",
    ]
    if rows:
        out += ["| revision | created_at | age (s) | outer/inner | loss | bytes |", "|---|---|---|---|---|---|", *rows]
    if latest:
        try:
            meta = read_manifest(storage, latest)
        except (StorageError, OSError, ValueError) as exc:
            meta = {"error": str(exc)}
        out += ["", f"{latest}/metadata.json:", ""]
        out += _fence(json.dumps(meta, indent=2, sort_keys=True).splitlines(), "json")
    return out


def section_config(cfg: Config, problems: Sequence[str], origin: str) -> list[str]:
    data = cfg.public_dict()
    data["upload"]["endpoint_url"] = _mask_url(str(data["upload"].get("endpoint_url", "")))
    data["upload"]["target"] = _mask_url(str(data["upload"].get("target", "")))
    out = [origin, ""]
    if problems:
        out += ["The config did not validate; the built-in defaults are shown instead. Problems:", ""]
        out += _fence(problems)
        out.append("")
    out += _fence(yaml.safe_dump(data, sort_keys=False).splitlines(), "yaml")
    return out


def _mask_url(url: str) -> str:
    return re.sub(r"(://)[^/@\s]+@", r"\1" + MASK + "@", url)


def _dist_version(*names: str) -> str:
    for name in names:
        try:
            return f"{importlib.metadata.version(name)} ({name})"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def section_versions() -> list[str]:
    import torch

    rows = [
        ("minerd", __version__),
        ("Python", sys.version.replace("\n", " ")),
        ("executable", sys.executable),
        ("platform", platform.platform()),
        ("machine", platform.machine()),
        ("torch", torch.__version__),
        ("CUDA (torch built with)", str(torch.version.cuda)),
        ("CUDA available", f"{torch.cuda.is_available()} (devices: {torch.cuda.device_count()})"),
        ("cuDNN", str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "n/a"),
    ]
    try:
        faiss = importlib.import_module("faiss")
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        rows.append(("faiss", f"{getattr(faiss, '__version__', '?')} (GPUs seen by faiss: {gpus})"))
    except Exception as exc:  # an import failure is itself worth reporting
        rows.append(("faiss", f"import failed: {exc}"))
    rows += [
        ("faiss package", _dist_version("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss")),
        ("numpy", _dist_version("numpy")),
        ("prometheus-client", _dist_version("prometheus-client", "prometheus_client")),
        ("fastapi", _dist_version("fastapi")),
        ("uvicorn", _dist_version("uvicorn")),
        ("pydantic", _dist_version("pydantic")),
        ("boto3", _dist_version("boto3")),
        ("nvidia-ml-py", _dist_version("nvidia-ml-py")),
    ]
    smi, _ = _run_tool(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"])
    rows.append(("NVIDIA driver", smi.splitlines()[0] if smi else "n/a (no nvidia-smi)"))
    return ["| component | version |", "|---|---|", *(f"| {k} | {v.replace('|', '/')} |" for k, v in rows)]


# --- the whole bundle ----------------------------------------------------------------------------
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
