"""A text corpus: which documents, in which order, which are held out.

A task's config names its corpus as a list of files, directories and glob patterns
(``lm.corpus`` for the language model). A directory is walked for
the supported extensions (hidden entries skipped); a file or a glob's matches must
have one of them. With the list empty, the corpus is the Python standard library of
the interpreter running minerd: real text and code that exist on every machine, with
no download.

A ``.txt``, ``.md`` or ``.py`` file is one document; a ``.jsonl`` line or a
``.parquet`` row is one document (its ``text``). Documents come in a fixed order
(entries as listed, files sorted by name), and each is held out for evaluation or
not by a hash of its key (its path relative to the entry, plus the line or row), so
the split never changes with the order or the machine.

A corpus is untrusted input, and every problem in it is one config error line (exit 2),
never a crash the supervisor would restart into: corpus files must be regular files (a
symbolic link to one is fine; a device, a FIFO or a socket is refused before it is
opened); walks and ``**`` do not follow symbolically linked directories and stop at
:data:`MAX_FILES` files or :data:`MAX_WALK_NAMES` names looked at; a document holds at
most :data:`MAX_DOCUMENT_BYTES` and a parquet row group at most
:data:`MAX_ROW_GROUP_BYTES` of text, both checked before the text is decoded.

Nothing here imports a model library, so ``minerd config validate`` can check paths.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import stat
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from daemon.config import ConfigError, problem

TEXT_SUFFIXES = (".txt", ".md", ".py")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
_GLOB_CHARS = set("*?[")
_STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "__pycache__"})

# The largest document, in UTF-8 bytes: a .txt/.md/.py file, a .jsonl line, a parquet
# row's text. A long book is a few MB and the standard library's largest file under
# 1 MB; 32 MiB leaves room for any real document while keeping what one tokenizer call
# holds (the text and its pre-tokenised pieces, a few times its size) well under a GB.
MAX_DOCUMENT_BYTES = 32 << 20
# The most text one parquet row group may hold once decoded. A row group is read whole
# (the text column only), so this bounds the memory a parquet file can take: about
# twice it at the peak (Arrow's copy and Python's strings). Spark writes 128 MB row
# groups and most dataset shards are smaller; pyarrow's default of a million rows can be
# larger, and the line says how to rewrite such a file.
MAX_ROW_GROUP_BYTES = 256 << 20
# The most rows one parquet row group may hold: a row group's rows are read as a small
# index each (4 bytes), and an index repeated through run-length encoding takes next to
# nothing on disk. pyarrow writes at most about a million rows a row group by default.
MAX_ROW_GROUP_ROWS = 16 << 20
# Rows turned into documents at once, from a row group already read.
PARQUET_BATCH_ROWS = 1 << 16
# The most files a corpus may name: every start stats each one (the corpus fingerprint)
# and keeps a few hundred bytes for it. The standard library is about 1,800 .py files and
# a web corpus a few thousand parquet shards; many small documents belong in .jsonl or
# .parquet files, a document per line or row.
MAX_FILES = 100_000
# The most directory entries one corpus's walks and ``**`` patterns look at, matched or
# not: a few seconds of listing. It stops a pattern like ``/**/*.txt`` or a directory
# that reaches far more than it holds (a bind-mount loop) early, with one line.
MAX_WALK_NAMES = 1_000_000


@dataclass(frozen=True)
class Source:
    path: Path  # the file read
    key: str  # its name in the split hash: the path relative to the entry that found it
    origin: str = "lm.corpus"  # the config key that named it, for the error lines about it


@dataclass(frozen=True)
class Document:
    key: str
    text: str


def corpus_error(what: str, value: object, origin: str) -> ConfigError:
    return ConfigError([problem(origin, what, value)])


def _size(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / (1 << 10):.1f} KiB" if n >= 1 << 10 else f"{n} bytes"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


class _Budget:
    """What one corpus's discovery may look at (MAX_WALK_NAMES) and keep (MAX_FILES)."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.names = 0
        self.files = 0

    def look(self, where: Path, entry: object) -> None:
        self.names += 1
        if self.names > MAX_WALK_NAMES:
            raise corpus_error(f"the walk looked at more than {MAX_WALK_NAMES} names (at {where}) and stopped; "
                               f"name the folders or files of the corpus more narrowly", entry, self.origin)

    def keep(self, entry: object) -> None:
        self.files += 1
        if self.files > MAX_FILES:
            raise corpus_error(f"more than {MAX_FILES} files; put small documents together in .jsonl or "
                               f".parquet files (a document per line or row)", entry, self.origin)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows a symbolic link: a link to a directory is a directory
    except OSError:
        return False


def _scan(folder: Path, budget: _Budget, entry: object) -> list[os.DirEntry[str]]:
    """The entries of ``folder`` (none when it cannot be listed, as os.walk and glob do)."""
    try:
        with os.scandir(folder) as it:
            entries = []
            for e in it:
                budget.look(folder, entry)
                entries.append(e)
            return entries
    except OSError:
        return []


# Walks and ``**`` descend into real directories only, never into a symbolic link to
# one (as os.walk, find and git do): a link back up the tree (``loop -> .``) would make
# the walk endless, and tracking visited (device, inode) pairs would still let one link
# to ``/`` pull in a whole file system. A link to a file is read; a linked directory is
# named in lm.corpus itself (an entry or a glob's non-recursive part may be a link).
def _walk(root: Path, budget: _Budget, entry: object, suffixes: tuple[str, ...] = SUFFIXES,
          skip: frozenset[str] = frozenset()) -> list[Source]:
    found = []
    todo = [root]
    while todo:
        folder = todo.pop()
        for e in _scan(folder, budget, entry):
            if e.name.startswith(".") or e.name in skip:
                continue
            if _is_dir(e):
                if not e.is_symlink():
                    todo.append(Path(e.path))
            elif e.name.endswith(suffixes):
                budget.keep(entry)
                path = Path(e.path)
                found.append(Source(path, path.relative_to(root).as_posix()))
    return sorted(found, key=lambda s: s.key)


def _magic(part: str) -> bool:
    return bool(_GLOB_CHARS & set(part))


def _below(base: Path, budget: _Budget, entry: object, files: bool) -> list[Path]:
    """``**``: ``base`` and every real directory under it (and every file, when ``files``),
    hidden names skipped, symbolically linked directories neither listed nor entered."""
    out = [base]
    todo = [base]
    while todo:
        folder = todo.pop()
        for e in _scan(folder, budget, entry):
            if e.name.startswith("."):
                continue
            if _is_dir(e):
                if not e.is_symlink():
                    out.append(Path(e.path))
                    todo.append(Path(e.path))
            elif files:
                out.append(Path(e.path))
    return out


def _glob(pattern: str, budget: _Budget) -> list[Path]:
    """The paths ``pattern`` matches, as ``glob.glob(pattern, recursive=True)`` finds them
    (``*`` and ``**`` skip hidden names) except that ``**`` does not follow symbolic links
    to directories, and every name looked at counts against MAX_WALK_NAMES."""
    parts = Path(os.path.expanduser(pattern)).parts
    fixed = next((i for i, part in enumerate(parts) if _magic(part)), len(parts))
    current = [Path(*parts[:fixed])] if fixed else [Path()]
    for i, part in enumerate(parts[fixed:], fixed):
        last = i == len(parts) - 1
        matched: list[Path] = []
        for base in current:
            if part == "**":
                matched += _below(base, budget, pattern, files=last)
            elif _magic(part):
                hidden_too = part.startswith(".")
                matched += [Path(e.path) for e in _scan(base, budget, pattern)
                            if (hidden_too or not e.name.startswith(".")) and fnmatch.fnmatchcase(e.name, part)]
            elif os.path.lexists(base / part):
                matched.append(base / part)
        current = matched
    return sorted(set(current))


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def _not_regular(path: Path, mode: int) -> str:
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    via = f" (a link to {os.path.realpath(path)})" if path.is_symlink() else ""
    return f"{path} is {kind}{via}, not a regular file: a corpus reads regular files only"


def _stat_regular(path: Path, entry: object, origin: str) -> os.stat_result:
    """The file's stat (through a symbolic link), or one line when it is not a regular file:
    /dev/zero, a FIFO or a socket would never end, block or not be text at all."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise corpus_error(f"cannot read {path}: {exc.strerror or exc}", entry, origin) from None
    if not stat.S_ISREG(st.st_mode):
        raise corpus_error(_not_regular(path, st.st_mode), entry, origin)
    return st


def _too_big(path: Path, size: int) -> str:
    return (f"{path} is {_size(size)}, over the {_size(MAX_DOCUMENT_BYTES)} a document may hold; split it "
            f"(or put its parts in a .jsonl file, a document per line)")


def _check_file(source: Source, entry: object, origin: str) -> None:
    st = _stat_regular(source.path, entry, origin)
    if source.path.suffix in TEXT_SUFFIXES and st.st_size > MAX_DOCUMENT_BYTES:
        raise corpus_error(_too_big(source.path, st.st_size), entry, origin)


def _supported(path: Path, entry: str, origin: str, suffixes: tuple[str, ...] = SUFFIXES) -> None:
    if path.suffix not in suffixes:
        raise corpus_error(f"unsupported file type {path.suffix or '(none)'} of {path}; use one of "
                           f"{' '.join(suffixes)}", entry, origin)


def discover(entries: list[str], origin: str = "lm.corpus") -> list[Source]:
    """The corpus files in reading order, or ConfigError (about the key ``origin``) for a
    path that is not there, an unsupported file, a file that is not a regular file (or a
    text file over MAX_DOCUMENT_BYTES), too many files, or a corpus with no file at all.
    Stats the files; opens none."""
    budget = _Budget(origin)
    if not entries:
        root = stdlib_root()
        stdlib = _walk(root, budget, str(root), suffixes=(".py",), skip=_STDLIB_SKIP)
        if not stdlib:
            raise corpus_error(f"empty: no .py file under the standard library at {root}", [], origin)
        for s in stdlib:
            _check_file(s, str(root), origin)
        return [replace(s, origin=origin) for s in stdlib]
    sources = find(entries, origin, SUFFIXES, budget)
    if not sources:
        raise corpus_error(f"empty: no {' '.join(SUFFIXES)} file found", entries, origin)
    return sources


def find(entries: list[str], origin: str, suffixes: tuple[str, ...], budget: _Budget | None = None) -> list[Source]:
    """The files of ``suffixes`` that ``entries`` name (files, directories walked, globs), in
    reading order and each once; ConfigError for a missing path, a file of another suffix, one
    that is not a regular file (or a text file over MAX_DOCUMENT_BYTES), or too many. Stats the
    files; opens none."""
    budget = budget or _Budget(origin)
    sources: list[Source] = []
    seen: set[Path] = set()
    for entry in entries:
        found: list[Source] = []
        if _magic(entry):
            matches = _glob(entry, budget)
            if not matches:
                raise corpus_error("the pattern matches no file", entry, origin)
            for match in matches:
                if match.is_dir():
                    found += [Source(s.path, f"{match.name}/{s.key}")
                              for s in _walk(match, budget, entry, suffixes=suffixes)]
                else:
                    _supported(match, entry, origin, suffixes)
                    budget.keep(entry)
                    found.append(Source(match, match.name))
        else:
            path = Path(entry).expanduser()
            if path.is_dir():
                found = _walk(path, budget, entry, suffixes=suffixes)
            elif os.path.lexists(path):
                _supported(path, entry, origin, suffixes)
                budget.keep(entry)
                found = [Source(path, path.name)]
            else:
                raise corpus_error("no such file or directory", entry, origin)
        for source in found:
            _check_file(source, entry, origin)  # before resolve(): a link loop is one line here
            real = source.path.resolve()
            if real not in seen:
                seen.add(real)
                sources.append(replace(source, origin=origin))
    return sources


def fingerprint(sources: list[Source]) -> str:
    """Changes when a file is added, removed, renamed, resized or rewritten (size and
    mtime, as make decides): cheap enough to check at every start, without reading."""
    h = hashlib.sha256()
    for s in sources:
        try:
            st = s.path.stat()
        except OSError as exc:  # gone since discover()
            raise corpus_error(f"cannot read {s.path}: {exc.strerror or exc}", str(s.path), s.origin) from None
        h.update(f"{s.key}\0{s.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def held_out(key: str, fraction: float) -> bool:
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _open_regular(source: Source) -> IO[bytes]:
    """``source`` opened for reading: checked by its path before it is opened (the file may
    have been replaced since discover()), then again on the open descriptor (and since the
    stat). O_NONBLOCK: opening a FIFO that slipped in between must not wait for a writer."""
    path = source.path
    _stat_regular(path, str(path), source.origin)  # a device is never opened
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise corpus_error(f"cannot read {path}: {exc.strerror or exc}", str(path), source.origin) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise corpus_error(_not_regular(path, st.st_mode), str(path), source.origin)
        if source.path.suffix in TEXT_SUFFIXES and st.st_size > MAX_DOCUMENT_BYTES:
            raise corpus_error(_too_big(path, st.st_size), str(path), source.origin)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_text(source: Source) -> str:
    with _open_regular(source) as fh:
        try:
            data = fh.read(MAX_DOCUMENT_BYTES + 1)  # never more, whatever the file has become
        except OSError as exc:
            raise corpus_error(f"cannot read {source.path}: {exc.strerror or exc}", str(source.path),
                               source.origin) from None
    if len(data) > MAX_DOCUMENT_BYTES:
        raise corpus_error(_too_big(source.path, len(data)), str(source.path), source.origin)
    return data.decode("utf-8", errors="replace")


def _utf8(text: str) -> str:
    """``text`` without lone surrogates (JSON's ``"\\ud800"``): the tokenizer cannot take them.
    They become replacement characters, as undecodable bytes of a text file do."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def json_rows(source: Source) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON value) of each non-blank line of a ``.jsonl`` file, every line
    read only up to MAX_DOCUMENT_BYTES; one ConfigError line naming the file and line for a
    line that cannot be read, is too long, nests too deep or is not JSON."""
    path, origin = source.path, source.origin

    def error(lineno: int, what: str, value: object) -> ConfigError:
        return corpus_error(f"line {lineno} of {path} {what}", value, origin)

    with _open_regular(source) as fh:
        lineno = 0
        while True:
            try:
                raw = fh.readline(MAX_DOCUMENT_BYTES + 1)  # a line is read whole only up to the cap
            except OSError as exc:
                raise error(lineno + 1, f"cannot be read: {exc.strerror or exc}", str(path)) from None
            if not raw:
                return
            lineno += 1
            if len(raw) > MAX_DOCUMENT_BYTES and not raw.endswith(b"\n"):
                raise error(lineno, f"is longer than the {_size(MAX_DOCUMENT_BYTES)} a document may hold",
                            str(path))
            if not raw.strip():
                continue
            shown = raw[:60].decode(errors="replace")
            try:
                yield lineno, json.loads(raw)
            except RecursionError:
                raise error(lineno, "nests deeper than the JSON reader follows", shown) from None
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                raise error(lineno, f"is not JSON ({exc})", shown) from None


def _jsonl(source: Source) -> Iterator[Document]:
    for lineno, row in json_rows(source):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            keys = sorted(row)[:5] if isinstance(row, dict) else type(row).__name__
            raise corpus_error(f"line {lineno} of {source.path} has no \"text\" string field", keys, source.origin)
        yield Document(f"{source.key}#{lineno}", _utf8(text))


def parquet_modules(source: Source) -> tuple[Any, Any, Any]:
    """pyarrow, pyarrow.compute and pyarrow.parquet, once ``source`` passed the checks every
    file does (pyarrow then opens it itself)."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - a declared dependency
        raise corpus_error("reading .parquet needs pyarrow (pip install pyarrow)", str(source.path),
                           source.origin) from None
    with _open_regular(source):
        pass
    return pa, pc, pq


def _parquet(source: Source) -> Iterator[Document]:
    """Each row's ``text``, a row group at a time, never more than MAX_ROW_GROUP_BYTES of
    text decoded at once.

    A row group is checked twice before its text is decoded: its text column's
    uncompressed size in the file's metadata (zstd makes 1 GB of repeated text a few KB),
    then, read with the column dictionary-encoded (its distinct values once, a small
    index per row), the size each row's text will have, which a value repeated through
    a dictionary makes far larger than the metadata says.
    """
    pa, pc, pq = parquet_modules(source)
    path, origin = source.path, source.origin
    try:
        names = pq.ParquetFile(path).schema_arrow.names
        if "text" not in names:
            raise corpus_error(f'{path} has no "text" column', names[:5], origin)
        pf = pq.ParquetFile(path, read_dictionary=["text"])  # reads the footer only
        field = pf.schema_arrow.field("text")
    except ConfigError:
        raise
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for a file that is not parquet
        raise corpus_error(f"{path} is not a readable parquet file: {exc}", str(path), origin) from None
    kind = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise corpus_error(f'the "text" column of {path} is not a string column', str(field.type), origin)
    meta = pf.metadata
    column = next(j for j in range(meta.num_columns) if meta.schema.column(j).path == "text")
    row = 0
    for group in range(meta.num_row_groups):
        where = f"row group {group + 1} of {path}"
        stored = meta.row_group(group).column(column).total_uncompressed_size
        rows = meta.row_group(group).num_rows
        if stored > MAX_ROW_GROUP_BYTES or rows > MAX_ROW_GROUP_ROWS:
            raise corpus_error(f"{where} holds {_size(stored)} of text uncompressed in {rows} rows, over the "
                               f"{_size(MAX_ROW_GROUP_BYTES)} or {MAX_ROW_GROUP_ROWS} rows a row group may hold; "
                               f"write the file with smaller row groups (pyarrow: write_table(..., "
                               f"row_group_size=...))", str(path), origin)
        plan: list[tuple[Any, list[Any]]] = []  # (each row's index into values, the distinct values), a chunk
        try:
            decoded = 0
            for chunk in pf.read_row_group(group, columns=["text"]).column(0).chunks:
                if not pa.types.is_dictionary(chunk.type):
                    chunk = chunk.dictionary_encode()
                sizes = pc.take(pc.binary_length(chunk.dictionary), chunk.indices)
                largest = pc.max(sizes).as_py() or 0
                if largest > MAX_DOCUMENT_BYTES:
                    first = pc.index(pc.greater(sizes, MAX_DOCUMENT_BYTES), True).as_py()
                    at = row + sum(len(indices) for indices, _ in plan) + first + 1
                    raise corpus_error(f"row {at} of {path} holds {_size(largest)} of text, over the "
                                       f"{_size(MAX_DOCUMENT_BYTES)} a document may hold", str(path), origin)
                decoded += pc.sum(sizes).as_py() or 0
                if decoded > MAX_ROW_GROUP_BYTES:
                    raise corpus_error(f"{where} holds more than {_size(MAX_ROW_GROUP_BYTES)} of text once decoded "
                                       f"({_size(stored)} stored: its values repeat through a dictionary), over what "
                                       f"a row group may hold", str(path), origin)
                plan.append((chunk.indices, chunk.dictionary.to_pylist()))
        except ConfigError:
            raise
        except Exception as exc:  # a damaged page, bad compression, text that is not UTF-8
            raise corpus_error(f"{where} cannot be read: {exc}", str(path), origin) from None
        for indices, values in plan:
            for start in range(0, len(indices), PARQUET_BATCH_ROWS):
                for index in indices.slice(start, PARQUET_BATCH_ROWS).to_pylist():
                    row += 1
                    if index is not None:
                        yield Document(f"{source.key}#{row}", values[index])


def _documents(source: Source) -> Iterator[Document]:
    if source.path.suffix == ".jsonl":
        return _jsonl(source)
    if source.path.suffix == ".parquet":
        return _parquet(source)
    return iter([Document(source.key, _read_text(source))])


def documents(sources: list[Source]) -> Iterator[Document]:
    """Every non-empty document, in corpus order. Text files that are not UTF-8 are read
    with replacement characters (the standard library has a few, on purpose)."""
    for source in sources:
        for doc in _documents(source):
            if doc.text.strip():
                yield doc


def split(sources: list[Source], eval_fraction: float, held: bool) -> Iterator[Document]:
    """The training documents (``held=False``) or the held-out ones (``held=True``)."""
    for doc in documents(sources):
        if held_out(doc.key, eval_fraction) == held:
            yield doc
