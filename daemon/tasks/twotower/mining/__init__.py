"""Asynchronous FAISS hard-negative mining.

Parts: :class:`MemoryBank` (the newest embedding of every document), :class:`AsyncMiner`
(a background thread that searches a FAISS index built from the bank) and
:class:`HardNegativeMiner`, the facade the trainer calls.

Per step, on the training thread (none of these calls waits for the miner)::

    miner = HardNegativeMiner.from_config(cfg.mining, num_docs, embed_dim, registry, seed)
    ...
    # every step, from the first epoch on: the banks hold the newest embeddings
    miner.observe_docs(item_ids, d_pos.detach())
    miner.observe_queries(item_ids, q.detach())        # only for submit_ids
    if miner.active(epoch):                            # epoch >= mining.start_epoch
        miner.start()                                  # once; builds the index from the bank
        for key in miner.upcoming(step):               # batch keys = global steps
            miner.submit_ids(step, key, item_ids_of_batch(key))
        neg_vecs, source = miner.negatives(step, step, q.detach(), item_ids)
        # neg_vecs: [B, num_negatives, E] float32 on q's device, detached: extra InfoNCE logits
    if step % cfg.telemetry.queue_health_every == 0:
        log.info(miner.queue_health_line(step))
    ...
    miner.stop(cfg.shutdown.deadline_seconds)

``submit_ids`` mines with the query embeddings observed when the items were last
trained (no extra forward pass). ``submit(step, key, q_ahead, positive_ids)`` takes
query vectors instead, e.g. from a no-grad forward of the upcoming batch (fresher
candidates, one more query-tower forward per step).

Semantics
---------
Batch keys.
    Every batch has an integer key that grows in training order (the global step at
    which it is trained is the natural one). ``submit`` and ``negatives`` name a batch
    by its key; a result is paired with the submission it was mined for (by identity)
    and is only ever applied to that batch: if the batch's positive ids or shape differ
    from the ones submitted, the mined rows are skipped for that step (logged once,
    counted in ``status()["mismatches"]``) and the fallback is used.
FIFO (``fifo_max``).
    The batches submitted and not yet trained, in key order. Training batch ``t`` pops
    every entry with a key <= t; entries of batches that were never trained are
    cancelled. ``submit`` refuses (returns False, never blocks) when the FIFO is full.
Batching and prefetch (``qbatch``, ``prefetch``).
    The miner thread starts a FAISS call only while fewer than ``prefetch`` mined results
    wait to be used; one call then takes every pending batch, up to ``qbatch`` queries.
    With the trainer ``lookahead`` batches ahead, a call mines about
    ``lookahead - prefetch + 1`` batches at once: that is how mining makes fewer, larger
    FAISS calls (about three batches a call at the defaults, ttl 5 and prefetch 3), and
    each batch still gets only its own rows.
TTL (``ttl``).
    A result is usable for ``ttl`` steps after the FAISS call that mined it started
    (age = step of use - the trainer's step when the call started, age <= ttl); an older
    one is stale: dropped, counted in ``status()["stale"]``, and the step falls back.
    ``lookahead = min(ttl, fifo_max)`` is therefore the furthest ahead worth submitting.
Sources, one per mining step (``minerd_mining_batches_total{source}``).
    ``fresh``: the step uses rows of a FAISS call that no earlier step has used.
    ``reused``: rows of a call an earlier step already used (a call that mined several
    batches), still within ttl. ``fallback``: no usable result (not submitted, not
    mined yet, stale, mismatched, miner dead or disabled): every negative comes from
    the memory bank. fresh + reused over all steps is the freshness; reused / fresh is
    how many batches a call serves.
Negatives of a step: ``num_negatives`` per query, ``[B, num_negatives, E]`` float32.
    The first ``n_hard = floor(num_negatives * hardneg_frac)`` slots come from FAISS:
    the mined candidates whose cosine with the query the batch was submitted with,
    computed with the candidates' bank rows as the miner thread read them right after
    the search, lies in [cos_min, cos_max], and that are not the query's positives,
    most similar first. Those very rows are the negatives' vectors, so the window holds
    for what enters the loss (a bank row changes only when its document is trained
    again, about once an epoch). Slots left empty (too few candidates in the window),
    and the other ``num_negatives - n_hard`` slots, hold random bank documents that are
    not the query's positives, read then too. The miner thread assembles all of it;
    the training thread only hands the array on (reading it there cost ~2 ms a step of
    cold memory). A fallback step reads random bank rows at use time. All vectors come
    from the bank: detached, no re-encoding.
Index (``index``, ``refresh_steps``, ``faiss_threads``).
    Inner product over a bank snapshot (``flat`` exact; ``ivf`` ~sqrt(n) lists, nprobe
    max(8, lists/8); ``hnsw`` M=32). Built at ``start()`` and again every
    ``refresh_steps`` steps, in the miner thread in small steps between searches, then
    swapped in. The miner thread sets ``faiss.omp_set_num_threads(faiss_threads)`` for
    itself; faiss is imported after torch, lazily; the small-batch non-BLAS path of faiss
    is disabled (below 128,000 query x dimension values faiss 1.15 takes a path ~7x slower).
Queue health.
    ``in_q``: batches submitted and not yet searched; ``out_q``: results mined and not
    yet used; ``fifo``: batches submitted and not yet trained (so fifo >= in_q + out_q).
    ``queue_health_line`` warns once out_q was 0 at two checks in a row: mining is the
    bottleneck, raise ``prefetch`` or ``qbatch`` (or ``ttl``).
"""

from daemon.tasks.twotower.mining.bank import MemoryBank
from daemon.tasks.twotower.mining.hardneg import HardNegativeMiner, Negatives
from daemon.tasks.twotower.mining.miner import AsyncMiner, MineTask

__all__ = ["AsyncMiner", "HardNegativeMiner", "MemoryBank", "MineTask", "Negatives"]
