"""(query, document) pairs made into the two-tower task's corpus of token ids, once.

The pairs (the ``code`` corpus or the user's ``pairs`` files) are split by
``split.is_held_out`` and numbered (``numbering.py``); a byte-level BPE is trained on the
training split's queries and documents (the tokenizer code the language model uses), or
the tokenizer of ``twotower.init_from``'s model directory is used as it is; every document
is cut to ``DOC_TOKENS`` tokens and every query to ``QUERY_TOKENS``, ids shifted by one so
that 0 pads. The result is written under ``<state_dir>/data/`` with the BPE, named by a
digest of what it was made from (the files' paths, sizes and times, the sizes and the
fraction, the model directory's tokenizer files): a later start reads it back in a second;
a changed file makes another.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import structlog
import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from daemon import atomic
from daemon.data.generated.corpus import Alternates, Corpus, TextInfo
from daemon.data.pairs.numbering import Numbered, number
from daemon.data.pairs.spec import PairsSpec
from daemon.data.pairs.split import Pair
from daemon.disk import save_safetensors

log = structlog.get_logger(__name__)

QUERY_TOKENS = 32  # a docstring's first paragraph: a sentence or two
DOC_TOKENS = 256  # a function's head and the start of its body: what a lexical match needs most
FORMAT = 2  # 2: every training query and the named negatives


def fingerprint(files: Sequence[Path]) -> list[tuple[str, int, int]]:
    """(path, size, modification time) of each file: what a change of the corpus changes."""
    out = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            continue
        out.append((str(f), st.st_size, st.st_mtime_ns))
    return out


def digest(spec: PairsSpec, files: Sequence[Path]) -> str:
    tokenizer_files: list[Path] = []
    if spec.init_from:  # the model directory's tokenizer numbers the tokens: its files count too
        folder = Path(spec.init_from).expanduser()
        tokenizer_files = sorted(p for p in folder.glob("*") if p.suffix in (".json", ".txt", ".model"))[:64]
    blob = json.dumps({"format": FORMAT, "spec": [spec.corpus, list(spec.entries), spec.vocab_size,
                                                  spec.eval_fraction, spec.eval_queries, spec.init_from],
                       "query": QUERY_TOKENS, "doc": DOC_TOKENS, "files": fingerprint(files),
                       "tokenizer": fingerprint(tokenizer_files)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


Encode = Callable[[list[str]], list[list[int]]]


def bpe_encoder(tok: Tokenizer) -> Encode:
    return lambda texts: [enc.ids for enc in tok.encode_batch(texts)]


def model_encoder(tok: PreTrainedTokenizerBase, width: int) -> Encode:
    """A model directory's own tokenizer, with the special tokens its model was trained with."""
    return lambda texts: tok(texts, add_special_tokens=True, truncation=True, max_length=width)["input_ids"]


def _ids(encode: Encode, texts: list[str], width: int) -> torch.Tensor:
    """Token ids + 1, cut to ``width`` and padded with 0."""
    out = np.zeros((len(texts), width), dtype=np.int64)
    for start in range(0, len(texts), 4096):
        for i, ids in enumerate(encode(texts[start:start + 4096])):
            ids = ids[:width]
            out[start + i, :len(ids)] = np.asarray(ids, dtype=np.int64) + 1
    return torch.from_numpy(out)


def _alternates(encode: Encode, per_doc: list[list[int]], texts: list[str], width: int) -> Alternates:
    start = np.zeros(len(per_doc) + 1, dtype=np.int64)
    start[1:] = np.cumsum([len(rows) for rows in per_doc])
    rows = np.fromiter((r for doc in per_doc for r in doc), dtype=np.int64, count=int(start[-1]))
    return Alternates(_ids(encode, texts, width), torch.from_numpy(start), torch.from_numpy(rows))


def idf_of(docs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """ln(1 + (N - df + 0.5) / (df + 0.5)) per token id over ``docs`` (BM25's idf, never negative);
    padding gets 0."""
    n = docs.shape[0]
    present = torch.zeros(vocab_size, dtype=torch.float64)
    for start in range(0, n, 8192):
        rows = docs[start:start + 8192]
        # Each (document, token) once: a key per cell, made unique, counted by token. A
        # [documents x vocabulary] table of flags would cost 64 MiB per chunk, and its sum 8 times that.
        keys = torch.unique(torch.arange(len(rows))[:, None] * vocab_size + rows)
        present += torch.bincount(keys % vocab_size, minlength=vocab_size).double()
    idf = torch.log1p((n - present + 0.5) / (present + 0.5)).float()
    idf[0] = 0.0
    return idf


def make(numbered: Numbered, spec: PairsSpec) -> tuple[Corpus, Tokenizer | None]:
    """The corpus of token ids, and the BPE it was made with (None: the model directory's own)."""
    from daemon.data.text.tokenizer import load_named, max_token_id, train_bpe

    n_train = numbered.num_train
    docs = numbered.docs
    bpe: Tokenizer | None = None
    if spec.init_from:
        named = load_named(spec.init_from, "twotower.init_from")
        vocab = max(len(named), max_token_id(named) + 1) + 1
        encode_q, encode_d = model_encoder(named, QUERY_TOKENS), model_encoder(named, DOC_TOKENS)
    else:
        def training_texts() -> Iterator[str]:
            for queries in numbered.queries:
                yield from queries
            yield from docs[:n_train]

        bpe = train_bpe(training_texts(), spec.vocab_size)
        vocab = bpe.get_vocab_size() + 1
        encode_q = encode_d = bpe_encoder(bpe)
    doc_ids = _ids(encode_d, docs, DOC_TOKENS)
    first = [queries[0] for queries in numbered.queries]
    more = [queries[1:] for queries in numbered.queries]
    more_texts = [q for queries in more for q in queries]
    rows, at = [], 0
    for queries in more:
        rows.append(list(range(at, at + len(queries))))
        at += len(queries)
    text = TextInfo(vocab, idf_of(doc_ids[:n_train], vocab),
                    queries=_alternates(encode_q, rows, more_texts, QUERY_TOKENS),
                    negatives=_alternates(encode_d, numbered.negatives, numbered.negative_texts, DOC_TOKENS))
    corpus = Corpus(doc_feats=doc_ids, query_feats=_ids(encode_q, first, QUERY_TOKENS),
                    eval_feats=_ids(encode_q, numbered.eval_queries, QUERY_TOKENS),
                    eval_targets=torch.tensor(numbered.eval_targets, dtype=torch.int64),
                    cluster_of=torch.arange(len(docs)), text=text)
    return corpus, bpe


def save(corpus: Corpus, tok: Tokenizer | None, folder: Path, meta: dict[str, object]) -> None:
    text = corpus.text
    assert text is not None and text.queries is not None and text.negatives is not None
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"doc_feats": corpus.doc_feats, "query_feats": corpus.query_feats, "eval_feats": corpus.eval_feats,
               "eval_targets": corpus.eval_targets, "idf": text.idf}
    for name, alt in (("queries", text.queries), ("negatives", text.negatives)):
        tensors.update({f"{name}.feats": alt.feats, f"{name}.start": alt.start, f"{name}.rows": alt.rows})
    if tok is not None:
        atomic.write_bytes(folder / "tokenizer.json", tok.to_str().encode())
    # The tensors last: their presence says the folder is whole.
    atomic.write_with(folder / "corpus.safetensors",
                      lambda tmp: save_safetensors(tensors, tmp, metadata={"meta": json.dumps(meta)}))


def load_saved(folder: Path) -> Corpus | None:
    """The saved corpus, each tensor copied out of the mapped file once: never the file's
    bytes and the tensors at the same time (a million documents are 2 GB of token ids)."""
    path = folder / "corpus.safetensors"
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            t = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        docs = t["doc_feats"]
        alts = [Alternates(t[f"{name}.feats"], t[f"{name}.start"], t[f"{name}.rows"])
                for name in ("queries", "negatives")]
        return Corpus(docs, t["query_feats"], t["eval_feats"], t["eval_targets"], torch.arange(docs.shape[0]),
                      TextInfo(int(t["idf"].shape[0]), t["idf"], *alts))
    except (SafetensorError, KeyError, OSError) as exc:
        log.warning("tokenized pairs unreadable; making them again", path=str(path), error=str(exc))
        return None


def load_or_make(spec: PairsSpec, files: Sequence[Path], read: Callable[[], Iterable[Pair]], data_dir: Path) -> Corpus:
    """The cached corpus for ``spec`` and these ``files``, or made from ``read()``'s pairs
    (read once, as they come: only the texts the corpus keeps are held)."""
    folder = data_dir / f"pairs-{digest(spec, files)}"
    found = load_saved(folder)
    if found is not None:
        return found
    t0 = time.perf_counter()
    numbered = number(read(), spec.eval_fraction, spec.eval_queries)
    if numbered.num_train == 0 or not numbered.eval_targets:
        from daemon.config import ConfigError, problem

        key = "twotower.pairs" if spec.corpus == "pairs" else "twotower.corpus"
        raise ConfigError([problem(key, f"{numbered.pairs} pairs give {numbered.num_train} to train on and "
                                   f"{len(numbered.eval_targets)} held-out queries; both must be at least one "
                                   "(add pairs, or groups)", spec.corpus)])
    corpus, tok = make(numbered, spec)
    text = corpus.text
    assert text is not None and text.queries is not None and text.negatives is not None
    meta: dict[str, object] = {
        "pairs": numbered.pairs, "documents": int(corpus.doc_feats.shape[0]), "train": corpus.num_train,
        "eval_queries": len(corpus.eval_targets), "more_queries": len(text.queries),
        "negatives": len(text.negatives), "vocab": text.vocab_size}
    del numbered  # the texts: the token ids are all that is kept
    save(corpus, tok, folder, meta)
    log.info("retrieval pairs tokenized", path=str(folder), seconds=round(time.perf_counter() - t0, 2), **meta)
    return corpus
