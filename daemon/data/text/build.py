"""The text source's builder: the tokenizer and the prepared dataset, made once by rank 0.

With a dataset named (``lm.dataset``) it is opened where it is: its index and tokenizer
are read, its shards when training first needs them. Without one, the corpus (the
standard library by default) is prepared into ``<state_dir>/data/<section>-dataset/`` at
the first start, by the same code as ``minerd data prepare``: later starts read its index
and find nothing to do; files added to the corpus are appended as new shards; a changed
or removed file, another tokenizer or another held-out fraction prepares it again.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from daemon.config import ConfigError, problem
from daemon.data.prepared.cache import ShardReader
from daemon.data.prepared.dataset import Location, locate, mismatched, reader_for
from daemon.data.prepared.prepare import Stale, Tok, prepare, read_index
from daemon.data.text.corpus import discover
from daemon.data.text.spec import TextSpec
from daemon.data.text.tokenizer import dtype_for, load_or_train, tokenizer_digest
from daemon.distributed import Launch, barrier
from daemon.errors import DataRefused
from daemon.plugin.parts import BuildContext
from daemon.storage import LocalStorage

log = structlog.get_logger("minerd.lm")


@dataclass
class TextData:
    tokenizer: PreTrainedTokenizerBase
    location: Location  # the dataset's storage, index and tokenizer
    reader: ShardReader  # its shards
    where: str  # the config key that named it, for error lines


@contextlib.contextmanager
def main_rank_first(launch: Launch) -> Iterator[None]:
    """Rank 0 trains the tokenizer and prepares the dataset; the others then read them."""
    if not launch.is_main:
        barrier()
    yield
    if launch.is_main:
        barrier()


def tok_spec(tokenizer: PreTrainedTokenizerBase, eval_fraction: float) -> Tok:
    backend = tokenizer.backend_tokenizer
    return Tok(backend.to_str(), tokenizer.eos_token_id, dtype_for(tokenizer).name, eval_fraction)


def _prepared_corpus(spec: TextSpec, tok: PreTrainedTokenizerBase, state_dir: Path) -> Path:
    dest = state_dir / "data" / f"{spec.section}-dataset"
    for old in (state_dir / "data").glob(f"{spec.section}-tokens-*"):  # the token cache of earlier versions
        log.info("removing a token cache of an earlier minerd version", path=str(old))
        shutil.rmtree(old, ignore_errors=True)
    want = tok_spec(tok, spec.eval_fraction)
    try:
        index = read_index(LocalStorage(dest), spec.key("corpus"))
    except ConfigError:
        index = None
        shutil.rmtree(dest, ignore_errors=True)
    if index is not None and (index.tokenizer_sha256, index.eval_fraction) != (want.sha256, want.eval_fraction):
        log.info("the tokenizer or lm.eval_fraction changed: preparing the corpus again", path=str(dest))
        shutil.rmtree(dest, ignore_errors=True)
    entries = list(spec.corpus)
    created = not dest.exists()
    try:
        try:
            _, added = prepare(entries, str(dest), want, workers=0, origin=spec.key("corpus"), where=spec.key("corpus"))
        except Stale as exc:
            log.info("corpus files changed since they were prepared: preparing the corpus again",
                     changed=exc.changed[:5], path=str(dest))
            shutil.rmtree(dest, ignore_errors=True)
            created = True
            _, added = prepare(entries, str(dest), want, workers=0, origin=spec.key("corpus"), where=spec.key("corpus"))
    except ConfigError:
        if created:  # a corpus problem found while tokenising leaves nothing behind
            shutil.rmtree(dest, ignore_errors=True)
        raise
    if not added:
        log.info("prepared corpus reused", path=str(dest))
    return dest


def _from_dataset(spec: TextSpec, loc: Location) -> PreTrainedTokenizerBase:
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(loc.tokenizer_json))
    if loc.index.eos is not None:
        eos = tok.convert_ids_to_tokens(loc.index.eos)
        tok.eos_token = tok.pad_token = eos
    return tok


def build(ctx: BuildContext, spec: TextSpec) -> TextData:
    state_dir = ctx.cfg.state_dir
    cache = Path(spec.cache_dir).expanduser() if spec.cache_dir else state_dir / "data" / "cache"
    with main_rank_first(ctx.launch):
        if spec.dataset:
            where = spec.key("dataset")
            loc = locate(where, spec.dataset)
            if bad := mismatched(loc):
                raise DataRefused(f"{where}: shard {bad[0]} of {spec.dataset} does not match its index "
                                  f"({len(bad)} shard(s) do not)")
            named = load_or_train(spec, [], state_dir / spec.section) if (spec.tokenizer or spec.init_from) else None
            if named is not None and tokenizer_digest(named) != loc.index.tokenizer_sha256:
                key = spec.key("tokenizer") if spec.tokenizer else spec.key("init_from")
                raise ConfigError([problem(where, f"was prepared with another tokenizer than {key}'s; prepare it "
                                           f"with --tokenizer {spec.tokenizer or spec.init_from}", spec.dataset)])
            tok = named or _from_dataset(spec, loc)
        else:
            where = spec.key("corpus")
            sources = discover(list(spec.corpus), where)
            tok = load_or_train(spec, sources, state_dir / spec.section)
            loc = locate(where, str(_prepared_corpus(spec, tok, state_dir)))
            if bad := mismatched(loc):  # our own copy: made again, not refused
                log.warning("the prepared corpus does not match its checksums; preparing it again", shards=bad[:5])
                shutil.rmtree(loc.storage.describe(), ignore_errors=True)
                loc = locate(where, str(_prepared_corpus(spec, tok, state_dir)))
    log.info("dataset", where=loc.storage.describe(), digest=loc.index.digest[:16],
             train_tokens=loc.index.tokens("train"), eval_tokens=loc.index.tokens("eval"),
             shards=len(loc.index.shards))
    return TextData(tok, loc, reader_for(loc, cache, spec.cache_bytes), where)
