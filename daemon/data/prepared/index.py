"""A prepared dataset's index: what shards it has, how many tokens each holds, their sha256.

A prepared dataset is a folder (or an ``s3://bucket/prefix``) of flat token shards
(``train-000000.tokens``, ``eval-000000.tokens``: token ids of one dtype, documents joined
by the end-of-text token), the ``tokenizer.json`` that made them, and ``index.json``,
written last. The index is read from wherever the dataset lives, so it is untrusted input:
its size is bounded before it is read, every field is checked for its type and range, and
a shard name must be a plain name of the dataset's own pattern (never a path).

The dataset's digest names exactly the token stream a training run sees: the tokenizer
and every shard's split, length and sha256, in order. The training order is derived from
it, so a validator holding the same index replays the same samples.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

FORMAT = 1
INDEX = "index.json"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "eval")
SHARD_RE = re.compile(r"^(train|eval)-([0-9]{6,9})\.tokens$")
# An index names a few hundred bytes per shard: a 2T-token dataset of 64M-token shards is
# about 30,000 of them (6 MB of index). 64 MiB leaves room for far more.
MAX_INDEX_BYTES = 64 << 20
MAX_SHARDS = 1_000_000
MAX_TOKENIZER_BYTES = 64 << 20
DTYPES = ("uint16", "uint32")


class BadIndex(ValueError):
    """An index that is not one this version reads, with the reason."""


@dataclass(frozen=True)
class Shard:
    name: str
    split: str
    tokens: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Source:
    """One file (or one part of one) a prepare consumed: appending skips the ones it finds here."""

    key: str  # the path as given to prepare, plus the file's path under it
    size: int
    mtime_ns: int


@dataclass
class Index:
    tokenizer_sha256: str
    dtype: str
    eos: int | None
    eval_fraction: float
    shard_tokens: int
    shards: list[Shard] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    format: int = FORMAT

    @property
    def itemsize(self) -> int:
        return int(np.dtype(self.dtype).itemsize)

    def split(self, name: str) -> list[Shard]:
        return [s for s in self.shards if s.split == name]

    def tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.split(split))

    @property
    def digest(self) -> str:
        """The token stream this dataset is, in 64 hex digits (sources and sizes on disk aside)."""
        blob = json.dumps({"format": self.format, "tokenizer": self.tokenizer_sha256, "dtype": self.dtype,
                           "shards": [[s.split, s.tokens, s.sha256] for s in self.shards]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_json(self) -> str:
        out = asdict(self)
        out["digest"] = self.digest
        return json.dumps(out, indent=1, sort_keys=True) + "\n"


def _int(obj: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise BadIndex(f"{key} must be a whole number from {lo} to {hi} (got {str(v)[:40]!r})")
    return v


def _str(obj: dict[str, Any], key: str, pattern: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not re.fullmatch(pattern, v):
        raise BadIndex(f"{key} is not {pattern!r} (got {str(v)[:40]!r})")
    return v


def parse(raw: bytes) -> Index:
    """The index in ``raw``, every field checked; BadIndex with the first problem."""
    if len(raw) > MAX_INDEX_BYTES:
        raise BadIndex(f"it holds {len(raw)} bytes, over the {MAX_INDEX_BYTES} an index may")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadIndex(f"it is not JSON ({str(exc)[:120]})") from None
    if not isinstance(data, dict):
        raise BadIndex("it is not a JSON object")
    if data.get("format") != FORMAT:
        raise BadIndex(f"format {str(data.get('format'))[:20]!r} is not {FORMAT}, the one this minerd reads")
    dtype = data.get("dtype")
    if dtype not in DTYPES:
        raise BadIndex(f"dtype must be one of {', '.join(DTYPES)} (got {str(dtype)[:20]!r})")
    itemsize = int(np.dtype(dtype).itemsize)
    eos = data.get("eos")
    if eos is not None:
        eos = _int(data, "eos", 0, (1 << (8 * itemsize)) - 1)
    fraction = data.get("eval_fraction")
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction < 1:
        raise BadIndex(f"eval_fraction must be a number in [0, 1) (got {str(fraction)[:20]!r})")
    shards_raw, sources_raw = data.get("shards"), data.get("sources", [])
    if not isinstance(shards_raw, list) or len(shards_raw) > MAX_SHARDS:
        raise BadIndex(f"shards must be a list of at most {MAX_SHARDS}")
    if not isinstance(sources_raw, list):
        raise BadIndex("sources must be a list")
    index = Index(
        tokenizer_sha256=_str(data, "tokenizer_sha256", "[0-9a-f]{64}"),
        dtype=dtype,
        eos=eos,
        eval_fraction=float(fraction),
        shard_tokens=_int(data, "shard_tokens", 1, 1 << 40),
    )
    seen: set[str] = set()
    for i, s in enumerate(shards_raw):
        if not isinstance(s, dict):
            raise BadIndex(f"shard {i} is not an object")
        try:
            name = _str(s, "name", SHARD_RE.pattern[1:-1])
            split = _str(s, "split", "train|eval")
            tokens = _int(s, "tokens", 0, index.shard_tokens)
            size = _int(s, "bytes", 0, index.shard_tokens * itemsize)
            sha = _str(s, "sha256", "[0-9a-f]{64}")
        except BadIndex as exc:
            raise BadIndex(f"shard {i}: {exc}") from None
        if not name.startswith(split + "-"):
            raise BadIndex(f"shard {i}: {name} is not a {split} shard's name")
        if size != tokens * itemsize:
            raise BadIndex(f"shard {i}: {name} has {size} bytes for {tokens} {dtype} tokens")
        if name in seen:
            raise BadIndex(f"shard {i}: {name} is named twice")
        seen.add(name)
        index.shards.append(Shard(name, split, tokens, size, sha))
    for i, s in enumerate(sources_raw[:MAX_SHARDS * 10]):
        if not isinstance(s, dict) or not isinstance(s.get("key"), str):
            raise BadIndex(f"source {i} is not an object with a key")
        index.sources.append(Source(s["key"], _int(s, "size", 0, 1 << 50), _int(s, "mtime_ns", -(1 << 62), 1 << 62)))
    return index


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tokens"
