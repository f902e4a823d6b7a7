"""retrieval: the two-tower task on the code corpus against BM25, and mining against none.

The default two-tower job (``train.task=twotower``: the code corpus of (docstring,
function) pairs from this machine's Python sources, text towers that start lexical, ID
embeddings) trains 8 epochs (2 with ``--quick``) in this process, twice from the same
seed: with hard-negative mining from epoch 2 (the false-negative filter on) and without
(in-batch negatives only). Each epoch ends with the evaluation on the held-out queries
(split by source file) against every document: the towers, BM25 over the same tokens and
their reciprocal-rank fusion.

- hybrid_over_bm25_points: hybrid recall@10 minus BM25's, in points (goal >= 3).
- mining_gain_points: the towers' recall@10 with mining minus without (goal >= 0).
- towers_recall10, bm25_recall10: the mined run's, reported.
- pairs: the corpus's pairs (documents trained on + held-out queries' documents).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import result
from daemon.logsetup import configure_logging
from daemon.run.local import cpu_run

BASE = ["train.task=twotower", "train.torch_threads=2", "upload.enabled=false", "api.enabled=false",
        "checkpoint.every_inner_steps=1000000", "telemetry.log_every=1000000", "telemetry.log_format=json"]


def train(epochs: int, state: Path, *extra: str) -> tuple[dict[str, float], list[dict[str, float]], float, Any]:
    """Train ``epochs`` epochs; (the last evaluation, every evaluation, seconds, the run)."""
    built = cpu_run([*BASE, f"paths.state_dir={state}", f"train.epochs={epochs}", *extra])
    run = built.run
    evals: list[dict[str, float]] = []
    original = run.task.evaluate

    def evaluate(*args: Any, **kwargs: Any) -> Any:
        found = original(*args, **kwargs)
        evals.append(dict(found.metrics))
        print(f"  {found.line}", flush=True)
        return found

    run.task.evaluate = evaluate  # type: ignore[method-assign]
    for component in run.components:
        component.start()
    t0 = time.perf_counter()
    try:
        run.trainer.run()
    finally:
        for component in reversed(run.components):
            component.stop(30)
    return evals[-1], evals, time.perf_counter() - t0, run


def main(quick: bool) -> None:
    configure_logging("json", "warning")
    epochs = 2 if quick else 8
    state = Path(tempfile.mkdtemp(prefix="bench-retrieval-"))
    print(f"mining from epoch 2 (false-negative filter on), {epochs} epochs:")
    mined, _, seconds_mined, run = train(epochs, state / "mined", "mining.enabled=true", "mining.start_epoch=2")
    print(f"in-batch negatives only, {epochs} epochs:")
    plain, _, seconds_plain, _ = train(epochs, state / "plain", "mining.enabled=false")
    corpus = run.task.corpus
    pairs = corpus.num_train + len(corpus.eval_targets)
    print(f"{'run':<28}{'towers r@10':>12}{'bm25 r@10':>11}{'hybrid r@10':>12}{'mrr@10':>8}{'seconds':>9}")
    for name, found, seconds in (("mining from epoch 2", mined, seconds_mined), ("in-batch only", plain,
                                                                                 seconds_plain)):
        print(f"{name:<28}{found['recall_at_10']:>12.3f}{found['bm25_recall_at_10']:>11.3f}"
              f"{found['hybrid_recall_at_10']:>12.3f}{found['mrr_at_10']:>8.3f}{seconds:>9.0f}")
    print(f"documents trained on {corpus.num_train}, searched {corpus.doc_feats.shape[0]}, "
          f"held-out queries {len(corpus.eval_targets)}")
    result("retrieval",
           hybrid_over_bm25_points=100 * (mined["hybrid_recall_at_10"] - mined["bm25_recall_at_10"]),
           towers_recall10=mined["recall_at_10"], bm25_recall10=mined["bm25_recall_at_10"],
           mining_gain_points=100 * (mined["recall_at_10"] - plain["recall_at_10"]), pairs=pairs)
