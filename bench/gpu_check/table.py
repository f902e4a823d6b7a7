"""The check's one table and its exit code."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

Status = Literal["PASS", "FAIL", "SKIP"]
PASS: Status = "PASS"
FAIL: Status = "FAIL"
SKIP: Status = "SKIP"

# A reason can be a page of a log; the table keeps one screen wide and results.json keeps it whole.
MAX_CELL = 110


@dataclass(frozen=True)
class Row:
    check: str
    value: str
    expected: str
    status: Status

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def passed(check: str, value: str, expected: str) -> Row:
    return Row(check, value, expected, PASS)


def failed(check: str, value: str, expected: str) -> Row:
    return Row(check, value, expected, FAIL)


def skipped(check: str, why: str, expected: str) -> Row:
    return Row(check, why, expected, SKIP)


def judged(check: str, ok: bool, value: str, expected: str) -> Row:
    return Row(check, value, expected, PASS if ok else FAIL)


def _cell(text: str) -> str:
    one_line = " ".join(text.split()).replace("|", "/")  # a pipe would split the Markdown cell
    return one_line if len(one_line) <= MAX_CELL else one_line[: MAX_CELL - 3] + "..."


def render(rows: Sequence[Row]) -> str:
    """A Markdown table, padded to line up in a terminal: it can go into docs/PERFORMANCE.md as is."""
    header = ("check", "value", "expected", "result")
    cells = [header] + [(_cell(r.check), _cell(r.value), _cell(r.expected), r.status) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) + " |" for cell in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def counts(rows: Sequence[Row]) -> dict[Status, int]:
    return {s: sum(r.status == s for r in rows) for s in (PASS, FAIL, SKIP)}


def exit_code(rows: Sequence[Row]) -> int:
    """1 when any check failed, else 0 (a skipped check is not a failure; an empty table is)."""
    if not rows:
        return 1
    return 1 if any(r.status == FAIL for r in rows) else 0
