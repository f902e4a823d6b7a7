"""The language-model task's builder: the model and its layout, on the text source's data."""

from __future__ import annotations

from daemon.data.text.build import TextData
from daemon.plugin.parts import BuildContext, TaskParts
from daemon.tasks.causal_lm.config import LmConfig
from daemon.tasks.causal_lm.export import HfLayout
from daemon.tasks.causal_lm.model import build_model, flops_per_token
from daemon.tasks.causal_lm.task import EVAL_GAUGES, CausalLmTask


def build(ctx: BuildContext, text: TextData) -> TaskParts:
    cfg, lm = ctx.cfg, LmConfig.of(ctx.cfg)
    tok = text.tokenizer
    task = CausalLmTask(cfg, text.tokens, tok, ctx.launch.world_size)
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
