"""The text source's builder: the tokenizer and the token cache, made once by rank 0."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from daemon.data.text.corpus import discover
from daemon.data.text.spec import TextSpec
from daemon.data.text.tokenizer import load_or_train
from daemon.data.text.tokens import Tokens, load_or_build
from daemon.distributed import Launch, barrier
from daemon.plugin.parts import BuildContext


@dataclass
class TextData:
    tokenizer: PreTrainedTokenizerBase
    tokens: Tokens  # both splits' token ids


@contextlib.contextmanager
def main_rank_first(launch: Launch) -> Iterator[None]:
    """Rank 0 trains the tokenizer and writes the token cache; the others then read them."""
    if not launch.is_main:
        barrier()
    yield
    if launch.is_main:
        barrier()


def build(ctx: BuildContext, spec: TextSpec) -> TextData:
    sources = discover(list(spec.corpus), spec.key("corpus"))
    state_dir = ctx.cfg.state_dir
    with main_rank_first(ctx.launch):
        tok = load_or_train(spec, sources, state_dir / spec.section)
        tokens = load_or_build(sources, tok, spec, state_dir / "data")
    return TextData(tok, tokens)
