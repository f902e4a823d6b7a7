"""The token cache: the corpus tokenised once, read back at every later start.

Each split is one flat file of token ids (``uint16`` while the vocabulary fits,
``uint32`` beyond), documents joined by the end-of-text token, read through a
memory map. A manifest names what the files were made from (the corpus
fingerprint, the tokenizer's digest, the split) and their sha256, and is written
last: a cache without a matching manifest, or whose bytes no longer match it, is
rebuilt, never trusted (a flipped byte could name a token the model does not
have). Older caches in the same directory are removed once a new one is complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import structlog
from transformers import PreTrainedTokenizerBase

import daemon.data.text.corpus as corpus
from daemon import atomic
from daemon.data.text.corpus import Document, Source
from daemon.data.text.spec import TextSpec
from daemon.data.text.tokenizer import max_token_id, tokenizer_digest

log = structlog.get_logger("minerd.lm")

FORMAT = 1
SUFFIX = "-tokens-"  # a cache folder is <section>-tokens-<digest> (lm-tokens-... for the language model)
MANIFEST = "manifest.json"
SPLITS = ("train", "eval")
BATCH_CHARS = 4 << 20  # text handed to the tokenizer at once (it parallelises inside a batch)


@dataclass
class Tokens:
    train: np.ndarray  # flat token ids of the training split
    eval: np.ndarray  # flat token ids of the held-out split
    folder: Path
    manifest: dict[str, Any]


def _dtype(tokenizer: PreTrainedTokenizerBase) -> np.dtype[Any]:
    # By the largest id, not the length: a vocabulary with holes has ids past its length.
    top = max(len(tokenizer) - 1, max_token_id(tokenizer))
    return np.dtype(np.uint16 if top < 1 << 16 else np.uint32)


def cache_key(sources: list[Source], tokenizer: PreTrainedTokenizerBase, spec: TextSpec) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "corpus": corpus.fingerprint(sources),
        "tokenizer": tokenizer_digest(tokenizer),
        "eval_fraction": spec.eval_fraction,
        "eos": tokenizer.eos_token_id,
        "dtype": _dtype(tokenizer).name,
    }


def _open(path: Path, dtype: np.dtype[Any]) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _read(folder: Path, key: dict[str, Any]) -> Tokens | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        return None
    dtype = np.dtype(key["dtype"])
    arrays = {}
    for split in SPLITS:
        path = folder / f"{split}.tokens"
        try:
            if path.stat().st_size != manifest[f"{split}_tokens"] * dtype.itemsize:
                return None
            # About 40 ms for the standard library's 17 MB: cheap beside a rebuild, once a start.
            if _sha256(path) != manifest[f"{split}_sha256"]:
                log.warning("token cache does not match its checksum; tokenising again", path=str(path))
                return None
        except (OSError, KeyError, TypeError):
            return None
        arrays[split] = _open(path, dtype)
    return Tokens(arrays["train"], arrays["eval"], folder, manifest)


def _batches(docs: Iterator[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer: one call, parallel inside
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


def _build(sources: list[Source], tokenizer: PreTrainedTokenizerBase, spec: TextSpec, folder: Path,
           key: dict[str, Any]) -> Tokens:
    dtype = _dtype(tokenizer)
    eos = tokenizer.eos_token_id
    counts = {f"{s}_{what}": 0 for s in SPLITS for what in ("tokens", "docs", "bytes")}
    t0 = time.perf_counter()
    log.info("tokenising the corpus", files=len(sources), folder=str(folder))
    with (atomic.atomic_open(folder / "train.tokens", "wb") as train_fh,
          atomic.atomic_open(folder / "eval.tokens", "wb") as eval_fh):
        out: dict[str, IO[bytes]] = {"train": train_fh, "eval": eval_fh}
        for batch in _batches(corpus.documents(sources)):
            for doc, ids in zip(batch, _encode(tokenizer, [d.text for d in batch]), strict=True):
                split = "eval" if corpus.held_out(doc.key, spec.eval_fraction) else "train"
                if eos is not None:
                    ids = [*ids, eos]
                out[split].write(np.asarray(ids, dtype=dtype).tobytes())
                counts[f"{split}_tokens"] += len(ids)
                counts[f"{split}_docs"] += 1
                counts[f"{split}_bytes"] += len(doc.text.encode("utf-8", "surrogatepass"))
    sums = {f"{split}_sha256": _sha256(folder / f"{split}.tokens") for split in SPLITS}
    manifest = {"key": key, **counts, **sums, "seconds": round(time.perf_counter() - t0, 2)}
    atomic.write_json(folder / MANIFEST, manifest)  # last: the files it names are complete
    log.info("token cache written", path=str(folder), **counts, seconds=manifest["seconds"])
    tokens = _read(folder, key)
    assert tokens is not None, "a cache just written reads back"
    return tokens


def load_or_build(sources: list[Source], tokenizer: PreTrainedTokenizerBase, spec: TextSpec,
                  data_dir: Path) -> Tokens:
    key = cache_key(sources, tokenizer, spec)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    prefix = f"{spec.section}{SUFFIX}"
    folder = data_dir / f"{prefix}{digest}"
    found = _read(folder, key)
    if found is not None:
        log.info("token cache reused", path=str(folder), train_tokens=int(found.train.size),
                 eval_tokens=int(found.eval.size))
        return found
    created = [p for p in (data_dir, folder) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tokens = _build(sources, tokenizer, spec, folder, key)
    except BaseException:
        # A corpus problem found while tokenising leaves nothing behind (bad input writes nothing).
        for path in reversed(created):
            shutil.rmtree(path, ignore_errors=True)
        raise
    for old in data_dir.glob(f"{prefix}*"):
        if old != folder:
            log.info("removing an older token cache", path=str(old))
            shutil.rmtree(old, ignore_errors=True)
    return tokens
