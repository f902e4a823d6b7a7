"""Global state department: the only place logging is configured.

structlog renders for people on a TTY (console) and for machines otherwise
(JSON lines, which is what pm2 and journald capture). The standard library's
loggers (uvicorn, torch) and ``warnings`` go through the same pipeline via
``ProcessorFormatter``, so every line in ``pm2 logs`` has one shape.

Lines operators grep for (``Outer Step: ...``, ``SLOW STEP: ...``) are the
event text itself; their structured fields travel in JSON and are left off
the console rendering, where they would only repeat the text.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import structlog
import structlog.tracebacks

# Fields carried by "line" events for machines; the console shows the text.
_LINE_FLAG = "line"
# Facts about this process on every line from every thread (the rank under
# torchrun); contextvars would not reach the publisher or miner threads.
_PROCESS_FIELDS: dict[str, Any] = {}
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _hide_line_fields_for_console(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    if event.pop(_LINE_FLAG, False):
        keep = {"event", "level", "timestamp", "logger", "exc_info", "stack", "_record", "_from_structlog"}
        for key in [k for k in event if k not in keep]:
            del event[key]
    return event


def _drop_line_flag(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    event.pop(_LINE_FLAG, None)
    return event


def bind_process_fields(**fields: Any) -> None:
    _PROCESS_FIELDS.update(fields)


def _add_process_fields(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in _PROCESS_FIELDS.items():
        event.setdefault(key, value)
    return event


def resolve_format(log_format: str, stream: Any = None) -> str:
    if log_format in ("console", "json"):
        return log_format
    stream = stream if stream is not None else sys.stderr
    return "console" if getattr(stream, "isatty", lambda: False)() else "json"


def configure_logging(log_format: str = "auto", level: str = "info", stream: Any = None) -> str:
    """Configure structlog and stdlib logging once; returns the format chosen."""
    stream = stream if stream is not None else sys.stderr
    fmt = resolve_format(log_format, stream)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _add_process_fields,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if fmt == "console":
        console = structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
        final: list[Any] = [_hide_line_fields_for_console, console]
    else:
        # ensure_ascii off: `grep "Separation Δ"` must match the JSON line too.
        json_renderer = structlog.processors.JSONRenderer(ensure_ascii=False)
        # Tracebacks as dicts, without frame locals: they are noise in a log and
        # could carry values that have no business there.
        tracebacks = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        final = [_drop_line_flag, tracebacks, json_renderer]
    renderer = final

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # uvicorn's access log at info would drown the step lines under scraping.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # torchft says every commit at INFO; minerd's own outer-step line carries the same facts.
    logging.getLogger("torchft").setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "torch"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.captureWarnings(True)
    return fmt


def reset_logging() -> None:
    """For tests: back to structlog's defaults and no root handlers."""
    structlog.reset_defaults()
    _PROCESS_FIELDS.clear()
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    logging.captureWarnings(False)


def json_record(line: str) -> dict[str, Any] | None:
    """The record of one JSON log line, after whatever its supervisor put before it (torchrun's
    rank prefix, pm2's date); None for a line that is not a JSON object (a console line, a
    traceback)."""
    start = line.find("{")
    if start < 0:
        return None
    try:
        record = json.loads(line[start:])
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def json_records(text: str) -> list[dict[str, Any]]:
    """Every JSON log record in ``text`` (a log file, or a process's captured output), in order."""
    return [r for r in map(json_record, text.splitlines()) if r is not None]
