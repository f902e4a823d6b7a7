"""The language-model task's builder: corpus, tokenizer, token cache, model, layout."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from daemon.distributed import Launch, barrier
from daemon.tasks.causal_lm import corpus, tokenizer, tokens
from daemon.tasks.causal_lm.export import HfLayout
from daemon.tasks.causal_lm.model import build_model, flops_per_token
from daemon.tasks.causal_lm.task import EVAL_GAUGES, CausalLmTask
from daemon.training.task import BuildContext, TaskParts


@contextlib.contextmanager
def main_rank_first(launch: Launch) -> Iterator[None]:
    """Rank 0 trains the tokenizer and writes the token cache; the others then read them."""
    if not launch.is_main:
        barrier()
    yield
    if launch.is_main:
        barrier()


def build(ctx: BuildContext) -> TaskParts:
    cfg, lm = ctx.cfg, ctx.cfg.lm
    sources = corpus.discover(lm.corpus)
    with main_rank_first(ctx.launch):
        tok = tokenizer.load_or_train(lm, sources, cfg.state_dir / "lm")
        cached = tokens.load_or_build(sources, tok, lm, cfg.state_dir / "data")
    task = CausalLmTask(cfg, cached, tok, ctx.launch.world_size)
    # A trained BPE may stop short of lm.vocab_size on a small corpus; the model keeps
    # the configured size so its shape does not depend on the text.
    vocab = len(tok) if lm.tokenizer or lm.init_from else max(len(tok), lm.vocab_size)
    model = build_model(lm, vocab, tok.eos_token_id, ctx.device)
    return TaskParts(
        task=task,
        model=model,
        sampler=ctx.sampler(task.num_items),
        layout=HfLayout.of(model, tok),
        eval_gauges=EVAL_GAUGES,
        tokens_per_sample=lm.seq_len,
        flops_per_token=flops_per_token(model, lm.seq_len),
    )
