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

Nothing here imports a model library, so ``minerd config validate`` can check paths.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from daemon.config import ConfigError, problem

TEXT_SUFFIXES = (".txt", ".md", ".py")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
PARQUET_BATCH_ROWS = 1024
_GLOB_CHARS = set("*?[")


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


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_sources() -> list[Source]:
    root = stdlib_root()
    skip = {"site-packages", "dist-packages", "__pycache__"}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append(Source(path, path.relative_to(root).as_posix()))
    return sorted(found, key=lambda s: s.key)


def _walk(root: Path) -> list[Source]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.endswith(SUFFIXES):
                path = Path(dirpath) / name
                found.append(Source(path, path.relative_to(root).as_posix()))
    return sorted(found, key=lambda s: s.key)


def _supported(path: Path, entry: str, origin: str) -> None:
    if path.suffix not in SUFFIXES:
        raise corpus_error(f"unsupported file type {path.suffix or '(none)'} of {path}; use one of "
                           f"{' '.join(SUFFIXES)}", entry, origin)


def discover(entries: list[str], origin: str = "lm.corpus") -> list[Source]:
    """The corpus files in reading order, or ConfigError (about the key ``origin``) for a
    path that is not there, an unsupported file, or a corpus with no file at all. Reads no file."""
    if not entries:
        stdlib = _stdlib_sources()
        if not stdlib:
            raise corpus_error(f"empty: no .py file under the standard library at {stdlib_root()}", [], origin)
        return [replace(s, origin=origin) for s in stdlib]
    sources: list[Source] = []
    seen: set[Path] = set()
    for entry in entries:
        found: list[Source] = []
        if _GLOB_CHARS & set(entry):
            matches = sorted(glob.glob(os.path.expanduser(entry), recursive=True))
            if not matches:
                raise corpus_error("the pattern matches no file", entry, origin)
            for match in map(Path, matches):
                if match.is_dir():
                    found += [Source(s.path, f"{match.name}/{s.key}") for s in _walk(match)]
                else:
                    _supported(match, entry, origin)
                    found.append(Source(match, match.name))
        else:
            path = Path(entry).expanduser()
            if path.is_dir():
                found = _walk(path)
            elif path.is_file():
                _supported(path, entry, origin)
                found = [Source(path, path.name)]
            else:
                raise corpus_error("no such file or directory", entry, origin)
        for source in found:
            real = source.path.resolve()
            if real not in seen:
                seen.add(real)
                sources.append(replace(source, origin=origin))
    if not sources:
        raise corpus_error(f"empty: no {' '.join(SUFFIXES)} file found", entries, origin)
    return sources


def fingerprint(sources: list[Source]) -> str:
    """Changes when a file is added, removed, renamed, resized or rewritten (size and
    mtime, as make decides): cheap enough to check at every start, without reading."""
    h = hashlib.sha256()
    for s in sources:
        st = s.path.stat()
        h.update(f"{s.key}\0{s.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def held_out(key: str, fraction: float) -> bool:
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _jsonl(source: Source) -> Iterator[Document]:
    with source.path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError:
                raise corpus_error(f"line {lineno} of {source.path} is not JSON", raw[:60].decode(errors="replace"),
                                   source.origin) from None
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                shown = sorted(row)[:5] if isinstance(row, dict) else type(row).__name__
                raise corpus_error(f'line {lineno} of {source.path} has no "text" string field', shown, source.origin)
            yield Document(f"{source.key}#{lineno}", text)


def _parquet(source: Source) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - a declared dependency
        raise corpus_error("reading .parquet needs pyarrow (pip install pyarrow)", str(source.path),
                           source.origin) from None
    try:
        pf = pq.ParquetFile(source.path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for a file that is not parquet
        raise corpus_error(f"{source.path} is not a readable parquet file: {exc}", str(source.path),
                           source.origin) from None
    if "text" not in pf.schema_arrow.names:
        raise corpus_error(f'{source.path} has no "text" column', pf.schema_arrow.names[:5], source.origin)
    row = 0
    for batch in pf.iter_batches(columns=["text"], batch_size=PARQUET_BATCH_ROWS):
        for text in batch.column(0).to_pylist():
            row += 1
            if isinstance(text, str):
                yield Document(f"{source.key}#{row}", text)


def documents(sources: list[Source]) -> Iterator[Document]:
    """Every non-empty document, in corpus order. Text files that are not UTF-8 are read
    with replacement characters (the standard library has a few, on purpose)."""
    for source in sources:
        if source.path.suffix == ".jsonl":
            docs: Iterator[Document] = _jsonl(source)
        elif source.path.suffix == ".parquet":
            docs = _parquet(source)
        else:
            try:
                text = source.path.read_bytes().decode("utf-8", errors="replace")
            except OSError as exc:
                raise corpus_error(f"cannot read {source.path}: {exc.strerror or exc}", str(source.path),
                                   source.origin) from None
            docs = iter([Document(source.key, text)])
        for doc in docs:
            if doc.text.strip():
                yield doc


def split(sources: list[Source], eval_fraction: float, held: bool) -> Iterator[Document]:
    """The training documents (``held=False``) or the held-out ones (``held=True``)."""
    for doc in documents(sources):
        if held_out(doc.key, eval_fraction) == held:
            yield doc
