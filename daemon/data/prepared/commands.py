"""``minerd data prepare | inspect | sample``: what the command line does with a dataset.

Each returns an exit code and prints its own lines; bad input is one line on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool

from daemon.config import ConfigError
from daemon.data.prepared.index import SPLITS, TOKENIZER, Index
from daemon.data.prepared.prepare import Stale, Tok, prepare, read_index
from daemon.data.prepared.record import ids_digest, sample_ids
from daemon.errors import DataUnreachable
from daemon.storage import Storage, StorageError, TooLarge, open_storage

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _err(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _open(dest: str, where: str) -> tuple[Storage, Index | None]:
    try:
        storage = open_storage(dest)
    except StorageError as exc:
        raise ConfigError([f"{where}: {exc}"]) from None
    return storage, read_index(storage, where)


def _tokenizer(storage: Storage, tokenizer: str, vocab_size: int, eval_fraction: float, entries: list[str]) -> Tok:
    """The tokenizer to prepare with: --tokenizer, else the one already in the destination,
    else a byte-level BPE trained on the sources' training split."""
    from tokenizers import Tokenizer

    import daemon.data.text.corpus as corpus
    from daemon.data.text.build import tok_spec
    from daemon.data.text.tokenizer import load_named, train_bpe, wrap

    if tokenizer:
        return tok_spec(load_named(tokenizer, "--tokenizer"), eval_fraction)
    raw = storage.get_bytes(TOKENIZER, 64 << 20)
    if raw is not None:
        return tok_spec(wrap(Tokenizer.from_str(raw.decode())), eval_fraction)
    sources = corpus.discover(entries, "SOURCE")
    _out(f"training a byte-level BPE of {vocab_size} tokens on the sources' training split")
    return tok_spec(wrap(train_bpe((d.text for d in corpus.split(sources, eval_fraction, held=False)), vocab_size)),
                    eval_fraction)


def _guarded(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except ConfigError as exc:
        for line in exc.problems:
            _err(line)
        return EXIT_USAGE
    except (DataUnreachable, StorageError) as exc:
        _err(f"minerd: error: {exc}")
        return EXIT_FAILED


def run_prepare(sources: list[str], out: str, tokenizer: str, vocab_size: int, shard_tokens: int, workers: int,
                eval_fraction: float) -> int:
    def go() -> int:
        storage, index = _open(out, "--out")
        fraction = index.eval_fraction if index is not None else eval_fraction
        tok = _tokenizer(storage, tokenizer, vocab_size, fraction, sources)
        try:
            done, written = prepare(sources, out, tok, shard_tokens=shard_tokens, workers=workers,
                                    storage=storage, on_shard=lambda s: _out(f"  {s.name}: {s.tokens} tokens"))
        except Stale as exc:
            _err(f"SOURCE: {len(exc.changed)} file(s) changed since they were prepared into {out} (first: "
                 f"{exc.changed[0]}); their tokens are in its shards already: prepare into another --out")
            return EXIT_USAGE
        except BrokenProcessPool:
            _err(f"a tokenising worker process died (out of memory?); the shards written so far are kept: run the "
                 f"same command to continue into {out} (with fewer --workers)")
            return EXIT_FAILED
        except KeyboardInterrupt:
            _err(f"interrupted: the shards written so far are kept; run the same command to continue into {out}")
            return 130
        what = "nothing new to prepare" if not written else f"{written} new shard(s)"
        _out(f"{out}: {what}; {len(done.shards)} shards, {done.tokens('train')} training and "
              f"{done.tokens('eval')} held-out tokens; digest {done.digest}")
        return EXIT_OK

    return _guarded(go)


def run_inspect(dest: str, verify: bool) -> int:
    def go() -> int:
        storage, index = _open(dest, "DEST")
        if index is None:
            _err(f"DEST: {dest} holds no index.json: not a prepared dataset")
            return EXIT_USAGE
        _out(f"{dest}: format {index.format}, {index.dtype} tokens, digest {index.digest}")
        _out(f"tokenizer sha256 {index.tokenizer_sha256}; held-out fraction {index.eval_fraction}; "
              f"{index.shard_tokens} tokens per full shard; {len(index.sources)} source file(s)")
        for split in SPLITS:
            shards = index.split(split)
            _out(f"{split}: {len(shards)} shards, {index.tokens(split)} tokens, {sum(s.bytes for s in shards)} bytes")
        if not verify:
            return EXIT_OK
        bad = 0
        for shard in index.shards:
            try:
                got = storage.fetch(shard.name, None, shard.bytes)
            except TooLarge:
                got = (shard.bytes + 1, "")
            if got != (shard.bytes, shard.sha256):
                bad += 1
                what = "missing" if got is None else (
                    f"{got[0]} bytes, not {shard.bytes}" if got[0] != shard.bytes else "sha256 does not match")
                _err(f"{shard.name}: {what}")
        _out(f"verified {len(index.shards) - bad} of {len(index.shards)} shards")
        return EXIT_FAILED if bad else EXIT_OK

    return _guarded(go)


def run_sample(dataset: str, seed: int, replica: int, replicas: int, rank: int, world_size: int, window: int,
               seq_len: int, batch_size: int, micro_batches: int, digest_only: bool) -> int:
    def go() -> int:
        if not 0 <= rank < world_size:
            raise ConfigError([f"--rank: {rank} is outside --world-size {world_size}"])
        if replicas and not 0 <= replica < replicas:
            raise ConfigError([f"--replica: {replica} is outside --replicas {replicas}"])
        _, index = _open(dataset, "--dataset")
        if index is None:
            raise ConfigError([f"--dataset: {dataset} holds no index.json: not a prepared dataset"])
        ids = sample_ids(index, seed, seq_len, batch_size, world_size, rank, replica, replicas, micro_batches,
                         window)
        _err(f"dataset {index.digest[:16]} seed {seed} replica {replica}/{replicas} rank {rank}/{world_size} "
             f"window {window}: {len(ids)} sequences of {seq_len} tokens; sha256 {ids_digest(ids)}")
        if digest_only:
            _out(ids_digest(ids))
        else:
            sys.stdout.write("".join(f"{i}\n" for i in ids.tolist()))
        return EXIT_OK

    return _guarded(go)

