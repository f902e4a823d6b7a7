"""The two-tower task's builder: the model for its corpus, and the retrieval features it plugs in."""

from __future__ import annotations

from daemon.data.generated.corpus import Corpus
from daemon.plugin.parts import BuildContext, TaskParts
from daemon.tasks.twotower.config import EmbeddingsConfig, MiningConfig
from daemon.tasks.twotower.embedding_hook import build_embeddings
from daemon.tasks.twotower.mining_hook import build_mining
from daemon.tasks.twotower.ranker_metrics import RankerCollector
from daemon.tasks.twotower.task import EVAL_GAUGES, TwoTowerTask, build_model
from daemon.upload.layout import WeightsLayout


def build(ctx: BuildContext, corpus: Corpus) -> TaskParts:
    cfg, device = ctx.cfg, ctx.device
    model = build_model(cfg, corpus).to(device)
    sampler = ctx.sampler(corpus.num_train)
    embeddings = (
        build_embeddings(cfg, sampler.num_items, ctx.registry, ctx.launch.world_size, ctx.on_disk_full)
        if EmbeddingsConfig.of(cfg).enabled else None
    )
    mining = (build_mining(cfg, corpus, model, sampler, device, ctx.registry)
              if MiningConfig.of(cfg).enabled else None)
    parts = TaskParts(
        task=TwoTowerTask(cfg, corpus, negatives=mining, doc_extra=embeddings.rows if embeddings else None),
        model=model,
        sampler=sampler,
        layout=WeightsLayout(),
        eval_gauges=EVAL_GAUGES,
    )
    if corpus.text is not None:  # towers, BM25 and their fusion, by the ranker label
        ctx.registry.register(RankerCollector(ctx.state))
    if embeddings is not None:
        parts.hooks.append(embeddings)
        parts.stateful["embeddings"] = embeddings
        parts.components.append(embeddings)  # its stop() writes the dirty chunks
        parts.sections["embeddings"] = embeddings.store.status
    if mining is not None:
        parts.hooks.append(mining)
        parts.components.append(mining)  # its thread starts at mining.start_epoch
        parts.sections["mining"] = mining.miner.status
    return parts
