"""The ``code`` corpus: (docstring, function) pairs from the Python sources already on the
machine, the interpreter's standard library and its installed packages, with no download.

For every function or method with a docstring, the query is the docstring's first
paragraph (cleaned as ``inspect.cleandoc`` does, whitespace collapsed) and the document is
the function's source, decorators included, with the docstring's lines taken out. The
source is cut from the file rather than rebuilt with ``ast.unparse``: it keeps the
comments and the layout a person wrote, which is what a code search is asked to find,
and it is several times faster. The function's own indentation is removed so a method
reads like a top-level function.

Documents are deduplicated by text, the first kept, in a fixed order (roots in order,
files sorted by path, functions in source order): the same pairs in the same order on
every run. Each pair's group is the sha256 of its file's path relative to its root, so a
file's functions are held out together.

Parsing is most of the cost (about 15,000 files here, the packages included). The files are
parsed in worker processes, one per core up to eight, in groups, and the results taken in file
order, so the pairs are the same as one process would make. The parse runs without the cyclic
garbage collector: a syntax tree holds no reference cycles, reference counting frees it, and
the collector's passes over the growing heap cost a third of one process's time.

The sources are walked as daemon/data/text/corpus.py walks a corpus (hidden names
skipped, symbolically linked directories not entered, the walk bounded); a file that is
not a regular file, is over :data:`MAX_SOURCE_BYTES` or does not parse is skipped
silently: these are the interpreter's own files, not the user's, and one odd file must
not stop the task.
"""

from __future__ import annotations

import ast
import gc
import hashlib
import inspect
import multiprocessing
import os
import signal
import stat
import sysconfig
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from importlib.util import decode_source
from pathlib import Path

from daemon.cores import machine_cores
from daemon.data.pairs.split import Pair
from daemon.data.text.corpus import _STDLIB_SKIP, Source, _Budget, _walk, stdlib_root

# The largest source file read. The standard library's largest is under 1 MB; generated
# modules (tables, vendored parsers) above this hold few documented functions.
MAX_SOURCE_BYTES = 2 << 20
# Docstrings shorter than this say too little to search by ("Return x.").
MIN_QUERY_WORDS = 3
# Tests document themselves for the test runner, not for a reader.
_SKIP = _STDLIB_SKIP | {"test", "tests", "idle_test"}
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
# Files per task handed to a worker: one small file's parse costs about what a hand-off does.
_GROUP = 64
_MAX_WORKERS = 8
# What a statement can hold statements through: a function definition is a statement, so it
# only ever sits in a list of these (a body, an else, a handler, a match case).
_BLOCKS = (ast.stmt, ast.excepthandler, ast.match_case)


def code_roots() -> list[Path]:
    """The standard library, then the installed packages (when they are elsewhere)."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    roots = [stdlib_root()]
    return roots if purelib == roots[0] else [*roots, purelib]


def _read(path: Path) -> bytes | None:
    """The file's bytes, or None when it is not a regular file or too big. Opened without
    blocking and checked again on the descriptor: a FIFO must never hold the walk."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SOURCE_BYTES:
                return None
            data = fh.read(MAX_SOURCE_BYTES + 1)  # never more, whatever the file has become
        except OSError:
            return None
    return None if len(data) > MAX_SOURCE_BYTES else data


def query_of(docstring: str) -> str | None:
    """The docstring's first paragraph on one line, or None when it is under MIN_QUERY_WORDS."""
    paragraph: list[str] = []
    for line in inspect.cleandoc(docstring).split("\n"):
        if not line.strip():
            if paragraph:
                break
            continue
        paragraph.append(line)
    words = " ".join(paragraph).split()
    return " ".join(words) if len(words) >= MIN_QUERY_WORDS else None


def _cut(line: str, col: int) -> tuple[str, str]:
    """``line`` split at ``col``, which ast counts in UTF-8 bytes."""
    raw = line.encode("utf-8", "surrogatepass")
    return raw[:col].decode("utf-8", "replace"), raw[col:].decode("utf-8", "replace")


def _document(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The function's source without its docstring, or None when the docstring shares a line
    with other code (``def f(): "doc"; ...``) or is all the body: rare, and skipped rather
    than cut mid-line or left as a bare signature."""
    doc = node.body[0]
    if len(node.body) < 2 or doc.end_lineno is None or node.end_lineno is None:
        return None
    before, _ = _cut(lines[doc.lineno - 1], doc.col_offset)
    _, after = _cut(lines[doc.end_lineno - 1], doc.end_col_offset or 0)
    if before.strip() or (after.strip() and not after.strip().startswith("#")):
        return None
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    if start >= doc.lineno:
        return None
    kept = lines[start - 1:doc.lineno - 1] + lines[doc.end_lineno:node.end_lineno]
    indent = kept[0][:len(kept[0]) - len(kept[0].lstrip())]
    # Lines of a multi-line string with less indentation are left as they are.
    return "\n".join(line[len(indent):] if line.startswith(indent) else line for line in kept).rstrip()


def functions_in(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every function and method in ``tree``, in no particular order. ``ast.walk`` would find
    the same ones, but it visits every expression node too: ten times the time, and most of
    the time the code corpus took to build."""
    found: list[ast.FunctionDef | ast.AsyncFunctionDef] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, _FUNCTIONS):
            found.append(node)
        for _, value in ast.iter_fields(node):
            if isinstance(value, list) and value and isinstance(value[0], _BLOCKS):
                todo.extend(value)
    return found


def pairs_from_source(text: str) -> Iterator[tuple[str, str]]:
    """(query, document) for each documented function in ``text``, in source order. Raises
    SyntaxError, ValueError or RecursionError for a source that does not parse."""
    tree = ast.parse(text)
    lines = text.split("\n")  # ast counts lines by \n only; decode_source made every ending one
    for node in sorted(functions_in(tree), key=lambda n: (n.lineno, n.col_offset)):
        docstring = ast.get_docstring(node, clean=False)
        if docstring is None:
            continue
        query = query_of(docstring)
        document = _document(lines, node) if query else None
        if query and document:
            yield query, document


def _file_pairs(path: Path) -> list[tuple[str, str]]:
    data = _read(path)
    if data is None:
        return []
    try:
        return list(pairs_from_source(decode_source(data)))
    except (SyntaxError, ValueError, RecursionError, LookupError, MemoryError):
        # UnicodeDecodeError is a ValueError; LookupError is a coding cookie naming no codec.
        return []


def _group_pairs(paths: list[Path]) -> list[list[tuple[str, str]]]:
    return [_file_pairs(path) for path in paths]


def _worker_start() -> None:
    # A stop (Ctrl-C, pm2, systemd) is the parent's to handle: a worker that died of it would
    # break the pool under a miner that is shutting down in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    gc.disable()  # see the module's docstring


def _workers(groups: int) -> int:
    return min(machine_cores(), _MAX_WORKERS, groups)


def _extracted(paths: list[Path]) -> Iterator[list[tuple[str, str]]]:
    """Each file's pairs, in the order of ``paths``."""
    groups = [paths[i:i + _GROUP] for i in range(0, len(paths), _GROUP)]
    workers = _workers(len(groups))
    if workers < 2:
        paused = gc.isenabled()
        gc.disable()  # see the module's docstring; only for the parse, and only if it was on
        try:
            for group in groups:
                yield from _group_pairs(group)
        finally:
            if paused:
                gc.enable()
        return
    # spawn: the parent may hold threads (torch's, the API server's) a fork would copy. A worker
    # that dies (killed, out of memory) breaks the pool: an error, never a hang.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_start) as pool:
        for result in pool.map(_group_pairs, groups):
            yield from result


def code_pairs(roots: Sequence[Path] | None = None) -> list[Pair]:
    """Every (docstring, function) pair under ``roots`` (default :func:`code_roots`), each
    document once, in a fixed order. Raises ConfigError only when a walk passes the bounds
    of daemon/data/text/corpus.py."""
    pairs: list[Pair] = []
    seen: set[str] = set()
    sources = code_sources(roots)
    for source, found in zip(sources, _extracted([s.path for s in sources]), strict=True):
        group = hashlib.sha256(source.key.encode("utf-8", "surrogatepass")).hexdigest()
        for query, document in found:
            if document not in seen:
                seen.add(document)
                pairs.append(Pair(query, document, group=group))
    return pairs


def code_sources(roots: Sequence[Path] | None = None) -> list[Source]:
    """The Python files the code corpus reads, in its order (stats nothing beyond the walk)."""
    found: list[Source] = []
    for root in code_roots() if roots is None else roots:
        found += _walk(root, _Budget("twotower.corpus"), str(root), suffixes=(".py",), skip=frozenset(_SKIP))
    return found
