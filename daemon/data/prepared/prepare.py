"""``minerd data prepare``: text sources tokenised into a prepared dataset.

Sources are read by the corpus rules (files, directories and globs of .txt .md .py .jsonl
.parquet, every problem one line), one file per work unit, tokenised by ``workers``
processes (0: in this process) and cut, in source order, into shards of exactly
``shard_tokens`` tokens per split (the last of a split shorter). The split is chosen per
document by a hash of its key, as for a corpus. The output does not depend on the number of
workers.

Resumable: after each shard, ``prepare.json`` records where each split's next shard starts
(a work unit and a token offset in it). A prepare stopped at any point (kill -9, Ctrl-C, a
full disk) continues from its last finished shard when run again with the same sources,
and writes byte-identical shards. Appendable: files the index already lists (same path,
size and modification time) are skipped; new ones add shards after the existing ones,
which are never rewritten. The index is written last.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

import daemon.data.text.corpus as corpus
from daemon import atomic
from daemon.config import ConfigError, problem
from daemon.data.prepared.index import (
    INDEX,
    MAX_INDEX_BYTES,
    SPLITS,
    TOKENIZER,
    BadIndex,
    Index,
    Shard,
    Source,
    parse,
    shard_name,
)
from daemon.errors import DataUnreachable
from daemon.storage import LocalStorage, Storage, StorageError, TooLarge, open_storage

log = structlog.get_logger("minerd.data")

PROGRESS = "prepare.json"
DEFAULT_SHARD_TOKENS = 1 << 26
_BATCH_CHARS = 4 << 20
GROUP_BYTES = 4 << 20  # source bytes handed to a worker process at once


class Stale(Exception):
    """Files the dataset holds tokens of changed since (path, what changed)."""

    def __init__(self, changed: list[str]) -> None:
        self.changed = changed
        super().__init__(", ".join(changed[:3]))


@dataclass(frozen=True)
class Tok:
    """What a worker needs of the tokenizer: its serialised form and the end-of-text id."""

    json: str
    eos: int | None
    dtype: str
    eval_fraction: float

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.json.encode()).hexdigest()


# ---- the workers -----------------------------------------------------------------------
_worker: dict[str, Any] = {}


def _init(tok: Tok, threads: int | None) -> None:
    if threads is not None:  # before the tokenizers library starts its thread pool
        os.environ["RAYON_RS_NUM_CPUS"] = str(threads)
    from tokenizers import Tokenizer

    _worker["tok"], _worker["spec"] = Tokenizer.from_str(tok.json), tok


def _tokenise(source: corpus.Source) -> dict[str, Any]:
    """A file's token ids per split, end-of-text after each document."""
    tok, spec = _worker["tok"], _worker["spec"]
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    docs = dict.fromkeys(SPLITS, 0)
    text_bytes = 0
    batch: list[corpus.Document] = []

    def flush() -> None:
        for doc, enc in zip(batch, tok.encode_batch([d.text for d in batch], add_special_tokens=False), strict=True):
            split = "eval" if corpus.held_out(doc.key, spec.eval_fraction) else "train"
            ids = enc.ids if spec.eos is None else [*enc.ids, spec.eos]
            parts[split].append(np.asarray(ids, dtype=spec.dtype))
            docs[split] += 1
        batch.clear()

    size = 0
    for doc in corpus.documents([source]):
        batch.append(doc)
        size += len(doc.text)
        text_bytes += len(doc.text.encode("utf-8", "surrogatepass"))
        if size >= _BATCH_CHARS:
            flush()
            size = 0
    flush()
    out: dict[str, Any] = {s: (np.concatenate(p) if p else np.zeros(0, spec.dtype)) for s, p in parts.items()}
    out["docs"], out["bytes"] = docs, text_bytes
    return out


def _tokenise_group(sources: list[corpus.Source]) -> list[dict[str, Any]]:
    return [_tokenise(s) for s in sources]


def _groups(units: list[corpus.Source]) -> Iterator[list[corpus.Source]]:
    """Consecutive files of about GROUP_BYTES together: one task per small file would cost more
    in hand-offs between processes than the tokenising."""
    group: list[corpus.Source] = []
    size = 0
    for unit in units:
        group.append(unit)
        try:
            size += unit.path.stat().st_size
        except OSError:
            size += GROUP_BYTES  # read (and refused) by the worker, alone
        if size >= GROUP_BYTES:
            yield group
            group, size = [], 0
    if group:
        yield group


def _results(units: list[corpus.Source], tok: Tok, workers: int) -> Iterator[dict[str, Any]]:
    """Each unit's tokens, in unit order. ``workers`` 0: in this process, the tokenizer's own
    threads on every core; N: N processes of one thread each, a bounded number of groups ahead."""
    if workers == 0 or not units:
        _init(tok, None)
        yield from map(_tokenise, units)
        return
    # spawn: the parent may hold threads (the tokenizers library's, torch's) a fork would copy.
    # A worker that dies (killed, out of memory) breaks the pool: an error, never a hang.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init, initargs=(tok, 1)) as pool:
        pending: deque[Future[list[dict[str, Any]]]] = deque()
        for group in _groups(units):
            pending.append(pool.submit(_tokenise_group, group))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


# ---- where the shards go ---------------------------------------------------------------
class _Dest:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.local = storage.root if isinstance(storage, LocalStorage) else None

    def write(self, name: str, data: bytes) -> None:
        if self.local is not None:
            atomic.write_bytes(self.local / name, data)
            return
        with tempfile.NamedTemporaryFile(prefix="minerd-shard-") as fh:
            fh.write(data)
            fh.flush()
            self.storage.put_file(name, Path(fh.name))

    def read(self, name: str, max_bytes: int) -> bytes | None:
        return self.storage.get_bytes(name, max_bytes)

    def remove(self, name: str) -> None:
        if self.local is not None:
            (self.local / name).unlink(missing_ok=True)
        else:
            self.storage.put_bytes(name, b"{}")  # an emptied progress record reads as none


def read_index(storage: Storage, where: str) -> Index | None:
    """The index at ``storage``, None when there is none; ConfigError when it is bad."""
    try:
        raw = storage.get_bytes(INDEX, MAX_INDEX_BYTES)
    except TooLarge as exc:
        raise ConfigError([problem(where, f"its {INDEX} is not a dataset index: {exc}", storage.describe())]) from None
    except StorageError as exc:
        raise DataUnreachable(f"{where}: cannot read {storage.describe()}/{INDEX}: {exc}") from None
    if raw is None:
        return None
    try:
        return parse(raw)
    except BadIndex as exc:
        raise ConfigError([problem(where, f"its {INDEX} is not a dataset index: {exc}", storage.describe())]) from None


def _source(s: corpus.Source) -> Source:
    st = s.path.stat()
    return Source(str(s.path), st.st_size, st.st_mtime_ns)


@dataclass
class _Split:
    unit: int = 0  # the work unit the split's next shard starts in
    offset: int = 0  # and the token there
    next: int = 0  # the number of its next shard


def prepare(
    entries: list[str],
    dest: str,
    tok: Tok,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int = 0,
    origin: str = "SOURCE",
    where: str = "--out",
    on_shard: Callable[[Shard], None] | None = None,
    storage: Storage | None = None,
) -> tuple[Index, int]:
    """Tokenise ``entries`` into ``dest``; (the index, how many shards this call wrote).
    Raises Stale when a file the index lists has changed, ConfigError for bad input."""
    storage = storage or open_storage(dest)
    out = _Dest(storage)
    if out.local is not None:
        out.local.mkdir(parents=True, exist_ok=True)
        for stale in out.local.glob(".*.tmp"):  # a write a kill interrupted
            stale.unlink(missing_ok=True)
    sources = corpus.discover(entries, origin)
    index = read_index(storage, where)
    if index is not None:
        if index.tokenizer_sha256 != tok.sha256:
            raise ConfigError([problem(where, "holds a dataset made with another tokenizer; prepare into "
                                       "another destination or name the same --tokenizer", dest)])
        if index.eval_fraction != tok.eval_fraction:
            raise ConfigError([problem("--eval-fraction", f"the dataset at {dest} was prepared with "
                                       f"{index.eval_fraction}", tok.eval_fraction)])
        shard_tokens = index.shard_tokens
    else:
        index = Index(tok.sha256, tok.dtype, tok.eos, tok.eval_fraction, shard_tokens)
    known = {s.key: s for s in index.sources}
    units, changed = [], []
    for s in sources:
        rec = _source(s)
        old = known.get(rec.key)
        if old is None:
            units.append((s, rec))
        elif (old.size, old.mtime_ns) != (rec.size, rec.mtime_ns):
            changed.append(rec.key)
    if changed:
        raise Stale(changed)
    session = [asdict(rec) for _, rec in units]
    splits = {s: _Split(next=1 + max((int(x.name.split("-")[1][:-7]) for x in index.split(s)), default=-1))
              for s in SPLITS}
    written: list[Shard] = []
    progress = _read_progress(out)
    if progress:
        if progress.get("units") != session or progress.get("tokenizer_sha256") != tok.sha256:
            raise ConfigError([problem(where, f"holds an unfinished prepare of other sources ({PROGRESS}); run it "
                                       f"again with the same sources, or remove {PROGRESS} to start over", dest)])
        splits = {s: _Split(**v) for s, v in progress["splits"].items()}
        written = [Shard(**s) for s in progress["shards"]]
        log.info("continuing an unfinished prepare", shards_done=len(written))
    if not units and not progress:
        return index, 0
    if out.read(TOKENIZER, 1 << 30) is None:
        out.write(TOKENIZER, tok.json.encode())
    state = {"units": session, "tokenizer_sha256": tok.sha256}

    def save() -> None:
        rec = {**state, "splits": {s: asdict(v) for s, v in splits.items()}, "shards": [asdict(s) for s in written]}
        out.write(PROGRESS, json.dumps(rec).encode())

    def emit(split: str, ids: np.ndarray) -> None:
        name = shard_name(split, splits[split].next)
        data = ids.astype(tok.dtype, copy=False).tobytes()
        out.write(name, data)
        shard = Shard(name, split, len(ids), len(data), hashlib.sha256(data).hexdigest())
        written.append(shard)
        splits[split].next += 1
        if on_shard is not None:
            on_shard(shard)

    t0, text_bytes = time.perf_counter(), 0
    buffers: dict[str, deque[tuple[int, int, np.ndarray]]] = {s: deque() for s in SPLITS}
    held = dict.fromkeys(SPLITS, 0)
    start = min(v.unit for v in splits.values())

    def cut(split: str, count: int, end_unit: int) -> None:
        buf, parts, need = buffers[split], [], count
        while need:
            unit, offset, arr = buf[0]
            take = min(need, len(arr))
            parts.append(arr[:take])
            need -= take
            if take == len(arr):
                buf.popleft()
            else:
                buf[0] = (unit, offset + take, arr[take:])
        held[split] -= count
        emit(split, np.concatenate(parts))
        # Where the split's next shard starts: the first token still held, or the next unit.
        splits[split].unit, splits[split].offset = (buf[0][0], buf[0][1]) if buf else (end_unit, 0)
        save()

    for u, result in enumerate(_results([s for s, _ in units[start:]], tok, workers), start=start):
        text_bytes += result["bytes"]
        for split in SPLITS:
            st, arr = splits[split], result[split]
            if u < st.unit:
                continue
            skip = st.offset if u == st.unit else 0
            if len(arr) > skip:
                buffers[split].append((u, skip, arr[skip:]))
                held[split] += len(arr) - skip
            while held[split] >= shard_tokens:
                cut(split, shard_tokens, u + 1)
    for split in SPLITS:
        if held[split]:
            cut(split, held[split], len(units))
    index.shards += written
    index.sources += [rec for _, rec in units]
    out.write(INDEX, index.to_json().encode())  # last: every shard it names is complete
    out.remove(PROGRESS)
    seconds = time.perf_counter() - t0
    log.info("dataset prepared", dest=storage.describe(), new_shards=len(written), files=len(units),
             text_bytes=text_bytes, seconds=round(seconds, 2))
    return index, len(written)


def _read_progress(out: _Dest) -> dict[str, Any] | None:
    try:
        raw = out.read(PROGRESS, 256 << 20)
    except StorageError:
        return None
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and data.get("units") is not None else None
