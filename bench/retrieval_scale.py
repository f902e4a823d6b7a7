"""retrieval_scale: a `pairs` corpus of a million documents, the ID embeddings on the disk
tier, and what the miner's memory holds.

A `.jsonl` of 1,000,000 (query, document) pairs (100,000 with ``--quick``) is written
first: documents of 40 words drawn from a Zipf law over 20,000 made-up words, queries of 6
of their words, one pair in ten naming a negative. Then, each in a fresh process so that
its peak resident memory is its own:

- first start: the pairs read, numbered and tokenized (the BPE trained on them), written
  to the cache, 30 training steps with mining on and the ID embeddings on disk, then one
  evaluation (towers, BM25 over every document, and the fusion);
- second start: the same from the cache.

The baseline is the corpus itself, the bytes of its token ids. ``build_over_tokens`` is
the peak resident memory of the build (the pairs read, numbered, tokenized and cached, or
read back; the model and the stores made; nothing trained) minus that of the same
process before it (torch and the miner imported), over those bytes: near 1 means the
tokens were held once, 2 or more that some step copied them whole.

- build_over_tokens, build_over_tokens_cached: first and second start (goal < 2);
- run_gb: the first start's whole peak over the baseline process (training with mining
  and the ID embedding caches, the evaluation's scores and BM25 index included), report;
- tokens_gb: the token ids' size; first_start_s, cached_start_s: to the end of step 1.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import random
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import result

WORDS = 20_000


def write_pairs(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(WORDS)]
    cum = list(itertools.accumulate(1.0 / (r + 1) for r in range(WORDS)))
    with path.open("w") as fh:
        for i in range(n):
            words = rng.choices(vocab, cum_weights=cum, k=40)
            row: dict[str, Any] = {"query": " ".join(rng.sample(words, 6)), "document": " ".join(words) + f" d{i}",
                                   "group": i // 4}
            if i % 10 == 0:
                row["negatives"] = [" ".join(rng.choices(vocab, cum_weights=cum, k=40))]
            fh.write(json.dumps(row) + "\n")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def one_start(state: str, pairs: str, steps: int, out: Any) -> None:
    """In a fresh process: build, train ``steps`` steps, evaluate; its peak memory."""
    import torch

    from daemon.engine.protocols import EvalPoint
    from daemon.logsetup import configure_logging
    from daemon.run.local import cpu_run

    configure_logging("json", "warning")
    before = peak_rss_bytes()
    t0 = time.perf_counter()
    built = cpu_run(["train.task=twotower", "twotower.corpus=pairs", f"twotower.pairs={pairs}",
                     "train.torch_threads=2", "upload.enabled=false", "api.enabled=false",
                     "embeddings.storage_mode=disk", "mining.enabled=true", "mining.start_epoch=0",
                     "checkpoint.every_inner_steps=1000000", "telemetry.log_every=1000000",
                     f"paths.state_dir={state}"])
    built_peak = peak_rss_bytes()  # the corpus read or made, the model, the stores: nothing trained yet
    run = built.run
    for component in run.components:
        component.start()
    try:
        run.trainer.inner_step()
        started = time.perf_counter() - t0
        for _ in range(steps - 1):
            run.trainer.inner_step()
        found = run.task.evaluate(run.trainer.model, run.device, EvalPoint(1, steps), lambda: None)
    finally:
        for component in reversed(run.components):
            component.stop(30)
    corpus = run.task.corpus  # type: ignore[attr-defined]
    tensors = [corpus.doc_feats, corpus.query_feats, corpus.eval_feats]
    text = corpus.text
    if text is not None:
        tensors += [alt.feats for alt in (text.queries, text.negatives) if alt is not None]
    out.put({"before": before, "built": built_peak, "peak": peak_rss_bytes(), "tokens": sum(t.nbytes for t in tensors),
             "started": started, "docs": int(corpus.doc_feats.shape[0]), "line": found.line,
             "threads": torch.get_num_threads()})


def start(state: Path, pairs: Path, steps: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=one_start, args=(str(state), str(pairs), steps, out))
    proc.start()
    got: dict[str, Any] = out.get(timeout=3600)
    proc.join(60)
    return got


def main(quick: bool) -> None:
    n = 100_000 if quick else 1_000_000
    root = Path(tempfile.mkdtemp(prefix="bench-retrieval-scale-"))
    pairs = root / "pairs.jsonl"
    t0 = time.perf_counter()
    write_pairs(pairs, n)
    print(f"wrote {n:,} pairs ({pairs.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s", flush=True)
    first = start(root / "state", pairs, 30)
    print(f"first start: {first['line']}", flush=True)
    cached = start(root / "state", pairs, 30)
    tokens = first["tokens"]
    print(f"{'start':<12}{'documents':>11}{'tokens GB':>10}{'build GB':>10}{'run GB':>8}{'to step 1 s':>13}")
    for name, got in (("first", first), ("from cache", cached)):
        print(f"{name:<12}{got['docs']:>11,}{tokens / 1e9:>10.2f}{(got['built'] - got['before']) / 1e9:>10.2f}"
              f"{(got['peak'] - got['before']) / 1e9:>8.2f}{got['started']:>13.0f}")
    result("retrieval_scale", docs=first["docs"], tokens_gb=tokens / 1e9,
           build_over_tokens=(first["built"] - first["before"]) / tokens,
           build_over_tokens_cached=(cached["built"] - cached["before"]) / tokens,
           run_gb=(first["peak"] - first["before"]) / 1e9,
           first_start_s=first["started"], cached_start_s=cached["started"])
