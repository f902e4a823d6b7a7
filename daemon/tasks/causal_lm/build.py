"""The language-model task's builder: the model and its layout, on the text source's data."""

from __future__ import annotations

import daemon.data.text.vocab as vocab
from daemon.config import ConfigError, problem
from daemon.data.prepared.cache import ShardCache
from daemon.data.prepared.dataset import PreparedDataset
from daemon.data.prepared.metrics import DataCollector, ReaderClosed, data_status, fetch_histogram
from daemon.data.prepared.order import DatasetOrder
from daemon.data.prepared.record import DataRecord
from daemon.data.text.build import TextData
from daemon.data.text.tokenizer import TOKENIZER_FILE, max_token_id
from daemon.diagnostics import accumulation_steps
from daemon.errors import CorruptState
from daemon.plugin.parts import BuildContext, TaskParts
from daemon.tasks.causal_lm.config import LmConfig
from daemon.tasks.causal_lm.export import HfLayout
from daemon.tasks.causal_lm.model import build_model, embedding_rows, flops_per_token
from daemon.tasks.causal_lm.task import EVAL_GAUGES, CausalLmTask


def build(ctx: BuildContext, text: TextData) -> TaskParts:
    cfg, lm = ctx.cfg, LmConfig.of(ctx.cfg)
    tok = text.tokenizer
    data = PreparedDataset(text.location.index, text.reader, lm.seq_len)
    if isinstance(text.reader, ShardCache):
        # The shard being read, the ones prefetched, and one arriving: never fewer.
        need = (lm.prefetch_shards + 2) * max(s.bytes for s in text.location.index.shards)
        if lm.cache_bytes < need:
            raise ConfigError([problem("lm.cache_bytes", f"holds fewer than {lm.prefetch_shards + 2} shards of "
                                       f"{lm.dataset} (the shard in use, lm.prefetch_shards={lm.prefetch_shards} "
                                       f"ahead, one arriving); raise it to at least {need}", lm.cache_bytes)])
    replica = lm.replica if lm.replica >= 0 else ctx.replica
    if lm.replicas and replica >= lm.replicas:
        raise ConfigError([problem("lm.replica", f"is not under lm.replicas={lm.replicas}", replica)])
    order = DatasetOrder(text.location.index.digest, cfg.train.seed, data.sequences, cfg.train.batch_size,
                         ctx.launch.rank, ctx.launch.world_size, replica, lm.replicas)
    task = CausalLmTask(cfg, data, order, tok, text.where)
    # A trained BPE may stop short of lm.vocab_size on a small corpus; the model keeps
    # the configured size so its shape does not depend on the text.
    vocab_size = len(tok) if lm.tokenizer or lm.init_from else max(len(tok), lm.vocab_size)
    model = build_model(lm, vocab_size, tok.eos_token_id, ctx.device)
    # Every id the tokenizer can produce must have an embedding row: a larger one is an
    # IndexError on a CPU and a device-side assert on a GPU, at the first batch holding it.
    # The text source refused such a tokenizer already where it could know the rows; here
    # they are the model's own.
    if why := vocab.ids_problem(max_token_id(tok), embedding_rows(model), "the model's input embedding"):
        if lm.tokenizer or lm.init_from:
            key = "lm.tokenizer" if lm.tokenizer else "lm.init_from"
            raise ConfigError([problem(key, why, lm.tokenizer or lm.init_from)])
        # The BPE trained at the first start has no holes: this one was edited since.
        raise CorruptState(f"{cfg.state_dir / 'lm' / TOKENIZER_FILE}: {why}")
    ctx.registry.register(DataCollector(text.reader))
    text.reader.stats.observe = fetch_histogram(ctx.registry).observe
    return TaskParts(
        task=task,
        model=model,
        sampler=order,
        layout=HfLayout.of(model, tok),
        eval_gauges=EVAL_GAUGES,
        tokens_per_sample=lm.seq_len,
        flops_per_token=flops_per_token(model, lm.seq_len),
        components=[ReaderClosed(text.reader)],
        data_record=DataRecord(text.location.index, cfg.train.seed, lm.seq_len, cfg.train.batch_size,
                               ctx.launch.world_size, replica, lm.replicas,
                               accumulation_steps(cfg, ctx.launch.world_size), cfg.train.inner_steps_per_outer),
        sections={"data": lambda: data_status(text.location, text.reader, replica, lm.replicas)},
        blocks=list(model.model.layers),
    )
