"""(query, document) pairs made into the two-tower task's corpus of token ids, once.

The pairs (the ``code`` corpus or the user's ``pairs`` files) are split by
``split.is_held_out``; a byte-level BPE is trained on the training split's queries and
documents (the tokenizer code the language model uses); every document is cut to
``DOC_TOKENS`` tokens and every query to ``QUERY_TOKENS``, ids shifted by one so that 0
pads. Documents are numbered training ones first (each with its first training query),
then those only held-out queries point at: every document is searched at evaluation, only
the first ones are trained. The result is written under ``<state_dir>/data/`` with the
tokenizer, named by a digest of what it was made from (the files' paths, sizes and times,
the sizes and the fraction): a later start reads it back in a second; a changed file makes
another.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import structlog
import torch
from safetensors import SafetensorError
from safetensors.torch import load
from tokenizers import Tokenizer

from daemon import atomic
from daemon.data.generated.corpus import Corpus, TextInfo
from daemon.data.pairs.spec import PairsSpec
from daemon.data.pairs.split import Pair, is_held_out
from daemon.disk import save_safetensors

log = structlog.get_logger(__name__)

QUERY_TOKENS = 32  # a docstring's first paragraph: a sentence or two
DOC_TOKENS = 256  # a function's head and the start of its body: what a lexical match needs most
FORMAT = 1


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
    blob = json.dumps({"format": FORMAT, "spec": [spec.corpus, list(spec.entries), spec.vocab_size,
                                                  spec.eval_fraction, spec.eval_queries],
                       "query": QUERY_TOKENS, "doc": DOC_TOKENS, "files": fingerprint(files)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _numbered(pairs: Sequence[Pair], eval_fraction: float, eval_queries: int
              ) -> tuple[list[str], list[str], list[str], list[int]]:
    """(documents, training query of each training document, held-out queries, their
    documents): training documents first, each once, with its first training query."""
    doc_id: dict[str, int] = {}
    docs: list[str] = []
    train_queries: list[str] = []
    held: list[Pair] = []
    for pair in pairs:
        if is_held_out(pair, eval_fraction):
            held.append(pair)
        elif pair.document not in doc_id:
            doc_id[pair.document] = len(docs)
            docs.append(pair.document)
            train_queries.append(pair.query)
    # A fixed, spread-out choice of held-out queries: by the hash of the query, not file order.
    held.sort(key=lambda p: hashlib.sha256(p.query.encode() + b"\0" + p.document.encode()).digest())
    eval_q: list[str] = []
    eval_t: list[int] = []
    for pair in held[:eval_queries]:
        if pair.document not in doc_id:
            doc_id[pair.document] = len(docs)
            docs.append(pair.document)
        eval_q.append(pair.query)
        eval_t.append(doc_id[pair.document])
    return docs, train_queries, eval_q, eval_t


def _ids(tokenizer: Tokenizer, texts: list[str], width: int) -> torch.Tensor:
    """Token ids + 1, cut to ``width`` and padded with 0."""
    out = np.zeros((len(texts), width), dtype=np.int64)
    for start in range(0, len(texts), 4096):
        for i, enc in enumerate(tokenizer.encode_batch(texts[start:start + 4096])):
            ids = enc.ids[:width]
            out[start + i, :len(ids)] = np.asarray(ids, dtype=np.int64) + 1
    return torch.from_numpy(out)


def idf_of(docs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """ln(1 + (N - df + 0.5) / (df + 0.5)) per token id over ``docs`` (BM25's idf, never negative);
    padding gets 0."""
    n = docs.shape[0]
    present = torch.zeros(vocab_size, dtype=torch.float64)
    for start in range(0, n, 8192):
        rows = docs[start:start + 8192]
        seen = torch.zeros(rows.shape[0], vocab_size, dtype=torch.bool)
        seen.scatter_(1, rows, True)
        present += seen.sum(0)
    idf = torch.log1p((n - present + 0.5) / (present + 0.5)).float()
    idf[0] = 0.0
    return idf


def make(pairs: Sequence[Pair], spec: PairsSpec) -> tuple[Corpus, Tokenizer]:
    """The corpus of token ids, and the tokenizer it was made with."""
    from daemon.data.text.tokenizer import train_bpe

    docs, train_q, eval_q, eval_t = _numbered(pairs, spec.eval_fraction, spec.eval_queries)
    n_train = len(train_q)

    def training_texts() -> Iterator[str]:
        yield from train_q
        yield from docs[:n_train]

    tok = train_bpe(training_texts(), spec.vocab_size)
    vocab = tok.get_vocab_size() + 1
    doc_ids = _ids(tok, docs, DOC_TOKENS)
    corpus = Corpus(doc_feats=doc_ids, query_feats=_ids(tok, train_q, QUERY_TOKENS),
                    eval_feats=_ids(tok, eval_q, QUERY_TOKENS), eval_targets=torch.tensor(eval_t, dtype=torch.int64),
                    cluster_of=torch.arange(len(docs)),
                    text=TextInfo(vocab, idf_of(doc_ids[:n_train], vocab)))
    return corpus, tok


def save(corpus: Corpus, tok: Tokenizer, folder: Path, meta: dict[str, object]) -> None:
    assert corpus.text is not None
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"doc_feats": corpus.doc_feats, "query_feats": corpus.query_feats, "eval_feats": corpus.eval_feats,
               "eval_targets": corpus.eval_targets, "idf": corpus.text.idf}
    atomic.write_bytes(folder / "tokenizer.json", tok.to_str().encode())
    # The tensors last: their presence says the folder is whole.
    atomic.write_with(folder / "corpus.safetensors",
                      lambda tmp: save_safetensors(tensors, tmp, metadata={"meta": json.dumps(meta)}))


def load_saved(folder: Path) -> Corpus | None:
    path = folder / "corpus.safetensors"
    if not path.exists():
        return None
    try:
        t = load(path.read_bytes())
        docs = t["doc_feats"]
        return Corpus(docs, t["query_feats"], t["eval_feats"], t["eval_targets"], torch.arange(docs.shape[0]),
                      TextInfo(int(t["idf"].shape[0]), t["idf"]))
    except (SafetensorError, KeyError, OSError) as exc:
        log.warning("tokenized pairs unreadable; making them again", path=str(path), error=str(exc))
        return None


def load_or_make(spec: PairsSpec, files: Sequence[Path], read: Callable[[], Sequence[Pair]], data_dir: Path) -> Corpus:
    """The cached corpus for ``spec`` and these ``files``, or made from ``read()``'s pairs."""
    folder = data_dir / f"pairs-{digest(spec, files)}"
    found = load_saved(folder)
    if found is not None:
        return found
    t0 = time.perf_counter()
    pairs = read()
    corpus, tok = make(pairs, spec)
    if corpus.num_train == 0 or len(corpus.eval_targets) == 0:
        from daemon.config import ConfigError, problem

        key = "twotower.pairs" if spec.corpus == "pairs" else "twotower.corpus"
        raise ConfigError([problem(key, f"{len(pairs)} pairs give {corpus.num_train} to train on and "
                                   f"{len(corpus.eval_targets)} held-out queries; both must be at least one "
                                   "(add pairs, or groups)", spec.corpus)])
    meta: dict[str, object] = {
        "pairs": len(pairs), "documents": int(corpus.doc_feats.shape[0]), "train": corpus.num_train,
        "eval_queries": len(corpus.eval_targets), "vocab": corpus.text.vocab_size if corpus.text else 0}
    save(corpus, tok, folder, meta)
    log.info("retrieval pairs tokenized", path=str(folder), seconds=round(time.perf_counter() - t0, 2), **meta)
    return corpus
