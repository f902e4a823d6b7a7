"""Finding, reading and picking lines from the miner's logs, for ``minerd bundle``.

Where the logs are (pm2's files, ``<state_dir>/logs``, ``--log FILE``, the systemd journal), reading
only the tail of each, parsing pm2-prefixed and JSON-record lines into ``LogLine``s merged in time
order, and choosing the lines each section shows (steps, warnings/errors, uploads, the logged GPU
DIAGNOSTICS block). Kept apart from the sections because it is plain text handling, with no torch,
config or network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.logsetup import json_record

PM2_APPS = ("distributed_training_miner", "distributed_training_miner_multigpu")
SYSTEMD_UNIT = "minerd"
TAIL_BYTES = 8 << 20  # of each log file
STEP_LINES = 20
PROBLEM_LINES = 30
UPLOAD_LINES = 20
DIAG_LINES = 21  # the "GPU DIAGNOSTICS" line and the 20 after it, as `grep -A 20`
MAX_LINE = 600

# pm2's log_date_format prefix ('YYYY-MM-DD HH:mm:ss.SSS Z: '), or an ISO time at the start.
_PM2_PREFIX = re.compile(r"^(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:\.\d+)?)(?: ?[+-]\d\d:?\d\d|Z)?: ")
_LEADING_TIME = re.compile(r"^(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:\.\d+)?)")
_PROBLEM_TEXT = re.compile(
    r"warn|error|exception|traceback|critical|fatal|RED FLAG|SLOW STEP|LOW GPU MEMORY|out of memory|killed",
    re.IGNORECASE,
)
_UPLOAD_TEXT = re.compile(r"UPLOAD|Successfully pushed|upload error|upload publisher", re.IGNORECASE)


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
    obj = json_record(text) if text.startswith("{") else None
    if obj is not None and "event" in obj:
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
