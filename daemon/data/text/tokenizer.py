"""The tokenizer: a byte-level BPE trained on the corpus once, or one the operator names.

With ``lm.tokenizer`` and ``lm.init_from`` empty, a byte-level BPE of ``lm.vocab_size``
tokens is trained on the training split at the first start (seconds on the standard
library) and kept as ``<state_dir>/lm/tokenizer.json``. Later starts reuse it whatever
the corpus has become since: a model's token ids must never change under it. To train
another, remove that file and the checkpoints. The same corpus gives a byte-identical
``tokenizer.json``.

A named tokenizer (``lm.tokenizer``: a ``tokenizer.json`` or a Hugging Face tokenizer
directory) or the one of ``lm.init_from`` is loaded as it is, offline, never running
code from the directory, and refused when it can produce a token id the model has no
embedding row for (see ``vocab.py``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

import daemon.data.text.corpus as corpus
import daemon.data.text.vocab as vocab
from daemon import atomic
from daemon.config import ConfigError, problem
from daemon.data.text.corpus import Source
from daemon.data.text.spec import TextSpec
from daemon.errors import CorruptState

log = structlog.get_logger("minerd.lm")

EOS = "<|endoftext|>"
TOKENIZER_FILE = vocab.TOKENIZER_FILE
META_FILE = "tokenizer.meta.json"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknown token
        special_tokens=[EOS],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """The Hugging Face face of a trained BPE: what save_pretrained writes and AutoTokenizer loads."""
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def max_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The largest id ``tokenizer`` can produce: over its vocabulary and its added tokens
    (not ``len(tokenizer) - 1``: a vocabulary may have holes)."""
    ids = [*tokenizer.get_vocab().values(), *getattr(tokenizer, "added_tokens_decoder", {})]
    return max(ids, default=-1)


def dtype_for(tokenizer: PreTrainedTokenizerBase) -> np.dtype[Any]:
    """The narrowest token dtype for ``tokenizer``'s ids: ``uint16`` while they fit."""
    # By the largest id, not the length: a vocabulary with holes has ids past its length.
    top = max(len(tokenizer) - 1, max_token_id(tokenizer))
    return np.dtype(np.uint16 if top < 1 << 16 else np.uint32)


def load_named(path: str, key: str) -> PreTrainedTokenizerBase:
    if why := vocab.named_problem(path):
        raise ConfigError([problem(key, why, path)])
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            # Code from a directory never runs (named_problem refused an auto_map already).
            return AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
        tok = PreTrainedTokenizerFast(tokenizer_file=str(p))
        if tok.eos_token is None and EOS in tok.get_vocab():
            # A bare tokenizer.json names no end-of-text token; minerd's BPE has one, which
            # separates documents in the training stream as it did when it was trained.
            tok.eos_token = tok.pad_token = EOS
        return tok
    except Exception as exc:  # the tokenizers library raises a plain Exception for a bad file
        raise ConfigError([problem(key, f"cannot load a tokenizer from it: {str(exc)[:200]}", path)]) from None


def _check_ids(tok: PreTrainedTokenizerBase, spec: TextSpec, key: str, value: str) -> PreTrainedTokenizerBase:
    """``tok``, or one line when it can produce an id the model has no embedding row for."""
    if spec.embedding_rows is not None:
        rows, rows_from = spec.embedding_rows, f"the vocab_size of {spec.key('init_from')}'s config.json"
    else:
        rows, rows_from = len(tok), f"one per token of the tokenizer, which has {len(tok)}"
    if why := vocab.ids_problem(max_token_id(tok), rows, rows_from):
        raise ConfigError([problem(key, why, value)])
    return tok


def load_or_train(spec: TextSpec, sources: list[Source], folder: Path) -> PreTrainedTokenizerBase:
    """The spec's named tokenizer, or the one trained on the corpus and kept in ``folder``."""
    if spec.tokenizer:
        key = spec.key("tokenizer")
        return _check_ids(load_named(spec.tokenizer, key), spec, key, spec.tokenizer)
    if spec.init_from:
        key = spec.key("init_from")
        return _check_ids(load_named(spec.init_from, key), spec, key, spec.init_from)
    path, meta_path = folder / TOKENIZER_FILE, folder / META_FILE
    if path.is_file():
        meta = _read_meta(meta_path)
        if meta.get("vocab_size") not in (None, spec.vocab_size):
            raise ConfigError([problem(
                spec.key("vocab_size"),
                f"the tokenizer in {folder} was trained with {meta['vocab_size']} tokens; a model's token ids "
                f"must not change under it: remove {path} and the checkpoints to train another",
                spec.vocab_size,
            )])
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises a plain Exception for a bad file
            raise CorruptState(f"{path} does not load as a tokenizer ({str(exc)[:200]})") from None
        if meta.get("corpus") not in (None, corpus.fingerprint(sources)):
            log.warning("the corpus changed since the tokenizer was trained; keeping the tokenizer", path=str(path))
        log.info("tokenizer reused", path=str(path), vocab_size=tok.get_vocab_size())
        return wrap(tok)
    t0 = time.perf_counter()
    log.info("training a byte-level BPE tokenizer on the training split", vocab_size=spec.vocab_size,
             files=len(sources))
    tok = train_bpe((d.text for d in corpus.split(sources, spec.eval_fraction, held=False)), spec.vocab_size)
    text = tok.to_str()
    atomic.write_text(path, text)
    atomic.write_json(meta_path, {
        "vocab_size": spec.vocab_size,
        "corpus": corpus.fingerprint(sources),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
    })
    log.info("tokenizer trained", path=str(path), vocab_size=tok.get_vocab_size(),
             seconds=round(time.perf_counter() - t0, 2))
    return wrap(tok)


def _read_meta(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """Identifies the token ids a tokenizer produces (its serialised form)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
