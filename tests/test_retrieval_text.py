"""The two-tower task on real text: the user's pairs (.jsonl, .parquet) and the code corpus,
text towers that start lexical, and BM25 and the hybrid ranking in every evaluation."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from prometheus_client import CollectorRegistry

from daemon.engine.protocols import EvalPoint
from daemon.run.local import cpu_run
from daemon.sharding import weights_digest, whole_weights
from tests.conftest import ROOT, cli

WORDS = ["parse", "read", "write", "open", "close", "socket", "header", "json", "encode", "decode", "path", "file",
         "buffer", "stream", "token", "number", "string", "list", "dict", "error", "retry", "timeout", "cache",
         "index", "query", "document", "rank", "score"]
LINE = re.compile(r"Epoch \d+ eval: recall@1=\d\.\d{3} recall@10=\d\.\d{3} \| Separation Δ: -?\d\.\d{3} \| "
                  r"mrr@10=\d\.\d{3} \| bm25 recall@10=\d\.\d{3} \| hybrid recall@10=\d\.\d{3}")


def rows(n: int = 1200, seed: int = 0) -> list[dict[str, object]]:
    """Queries of three topic words; documents that repeat them among others (a lexical task)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = rng.sample(WORDS, 3)
        doc = " ".join(rng.choices(WORDS, k=30) + topic * 2 + [f"fn{i}"])
        out.append({"query": " ".join(topic) + f" fn{i}", "document": doc, "group": i % 200})
    return out


def assert_exact_resume(sets_for: Callable[[Path], list[str]], tmp_path: Path, steps: int) -> Any:
    """A run stopped after ``steps`` steps (a checkpoint) and resumed for ``steps`` more ends
    with the weights of ``2 * steps`` straight; the straight run."""
    straight = cpu_run(sets_for(tmp_path / "a")).run
    for _ in range(2 * steps):
        straight.trainer.inner_step()
    first = cpu_run(sets_for(tmp_path / "b")).run
    for _ in range(steps):
        first.trainer.inner_step()
    first.trainer.checkpoint("test")
    for component in reversed(first.components):
        component.stop(10)
    again = cpu_run(sets_for(tmp_path / "b")).run
    assert again.trainer.resume()
    for _ in range(steps):
        again.trainer.inner_step()
    assert weights_digest(whole_weights(again.trainer.model)) == weights_digest(whole_weights(straight.trainer.model))
    for component in reversed([*straight.components, *again.components]):
        component.stop(10)
    return straight


def write_jsonl(path: Path, data: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


def write_parquet(path: Path, data: list[dict[str, object]]) -> Path:
    table = pa.table({"query": [r["query"] for r in data], "document": [r["document"] for r in data],
                      "group": [str(r["group"]) for r in data]})
    pq.write_table(table, path)
    return path


def sets(state: Path, pairs: Path, *extra: str) -> list[str]:
    return ["train.task=twotower", "twotower.corpus=pairs", f"twotower.pairs={pairs}", "twotower.vocab_size=300",
            "twotower.eval_fraction=0.1", "twotower.embed_dim=32", "twotower.eval_queries=100",
            "train.batch_size=32", "train.effective_batch_size=32", "train.torch_threads=1", "mining.enabled=false",
            "upload.enabled=false", "telemetry.log_format=json", f"paths.state_dir={state}", *extra]


class TestPairsCorpus:
    @pytest.mark.parametrize("kind", ["jsonl", "parquet"])
    def test_trains_and_evaluates_with_bm25_and_the_hybrid(self, tmp_path: Path, kind: str) -> None:
        data = rows()
        path = (write_jsonl(tmp_path / "p.jsonl", data) if kind == "jsonl"
                else write_parquet(tmp_path / "p.parquet", data))
        registry = CollectorRegistry()
        built = cpu_run(sets(tmp_path / "s", path), registry=registry)
        run = built.run
        assert 0 < run.task.num_items < run.task.num_docs <= len(data)  # held-out documents are searched too
        first = run.task.evaluate(run.trainer.model, run.device, EvalPoint(0, 0), lambda: None)
        # Lexical from the start: the untrained towers (a 32-wide random projection of TF-IDF) find
        # 40% of 1,198 documents in their top 10 (random towers: under 1%).
        assert first.metrics["recall_at_10"] > 0.3, first.line
        for _ in range(20):
            run.trainer.inner_step()
        result = run.task.evaluate(run.trainer.model, run.device, EvalPoint(1, 20), lambda: None)
        assert LINE.fullmatch(result.line), result.line
        for key in ("recall_at_1", "recall_at_10", "mrr_at_10", "bm25_recall_at_10", "hybrid_recall_at_10",
                    "bm25_mrr_at_10", "hybrid_recall_at_1"):
            assert 0.0 <= result.metrics[key] <= 1.0, key
        built.state.eval = dict(result.metrics)
        for ranker in ("towers", "bm25", "hybrid"):
            value = registry.get_sample_value("minerd_eval_ranker_recall_at_10", {"ranker": ranker})
            key = "recall_at_10" if ranker == "towers" else f"{ranker}_recall_at_10"
            assert value == pytest.approx(result.metrics[key])

    def test_the_split_is_stable_across_restarts_and_machines(self, tmp_path: Path) -> None:
        """The same pairs give the same documents, queries and held-out set: read back by a
        restart, and made again from scratch in another state directory (another machine)."""
        path = write_jsonl(tmp_path / "p.jsonl", rows())
        corpora = [cpu_run(sets(tmp_path / name, path)).run.task.corpus for name in ("a", "a", "b")]
        for other in corpora[1:]:
            for field in ("doc_feats", "query_feats", "eval_feats", "eval_targets"):
                assert torch.equal(getattr(corpora[0], field), getattr(other, field)), field
        shuffled = rows()
        random.Random(5).shuffle(shuffled)
        moved = cpu_run(sets(tmp_path / "c", write_jsonl(tmp_path / "q.jsonl", shuffled))).run.task.corpus
        held = {int(t) for t in corpora[0].eval_targets}
        assert len(held) == len({int(t) for t in moved.eval_targets})  # the same held-out pairs, in another order

    def test_exact_resume(self, tmp_path: Path) -> None:
        path = write_jsonl(tmp_path / "p.jsonl", rows())
        assert_exact_resume(lambda state: sets(state, path, "embeddings.enabled=true"), tmp_path, 3)


class TestWhatEachPairTrains:
    def test_a_document_with_several_queries_takes_them_in_turn(self, tmp_path: Path) -> None:
        data = rows()
        doc = data[0]["document"]
        extra = [{"query": f"alternate wording {k}", "document": doc, "group": data[0]["group"]} for k in range(2)]
        run = cpu_run(sets(tmp_path / "s", write_jsonl(tmp_path / "p.jsonl", data + extra))).run
        corpus = run.task.corpus
        (i,) = [i for i in range(corpus.num_train)
                if torch.equal(corpus.doc_feats[i], run.task.corpus.doc_feats[0])] or [None]
        assert i == 0, "the first training document is the first pair's"
        assert corpus.text.queries.counts(torch.tensor([0])).item() == 2
        seen = [run.task.queries_of(torch.tensor([0, 1]), epoch)[0] for epoch in (1, 2, 3, 4)]
        assert torch.equal(seen[0], corpus.query_feats[0]) and torch.equal(seen[3], seen[0])
        assert not torch.equal(seen[1], seen[0]) and not torch.equal(seen[2], seen[1])
        # A document with one query keeps it every epoch.
        assert all(torch.equal(run.task.queries_of(torch.tensor([1]), e)[0], corpus.query_feats[1]) for e in (1, 2))

    def test_named_negatives_train_beside_in_batch_ones(self, tmp_path: Path) -> None:
        data = rows()
        for k, row in enumerate(data):
            if k % 2 == 0:  # every other pair names a negative: another pair's document, and a new text
                row["negatives"] = [str(data[k + 1]["document"]), f"unrelated text number {k}"]
        run = cpu_run(sets(tmp_path / "s", write_jsonl(tmp_path / "p.jsonl", data))).run
        named = run.task.corpus.text.negatives
        assert len(named) > 0 and int(named.counts(torch.arange(run.task.num_items)).max()) == 2
        from daemon.engine.protocols import BatchPos
        from daemon.tasks.twotower.task import info_nce

        idx = torch.arange(32)
        batches = [run.task.get_batch(idx, run.device, BatchPos(epoch, 0)) for epoch in (1, 2)]
        assert batches[0].named is not None and 0 < int(batches[0].named.sum()) < 32
        assert not torch.equal(batches[0].negatives, batches[1].negatives)  # the two named ones take turns
        b = batches[0]
        model = run.trainer.model
        loss = run.task.loss(model, b, 1)
        extra = run.task.doc_extra(b.ids) if run.task.doc_extra is not None else None  # the ID embeddings
        q, d, negs = model(b.queries, b.docs, extra, b.negatives)
        full = info_nce(q, d, 0.05, negs.unsqueeze(1), b.named.unsqueeze(1))
        assert loss.item() == pytest.approx(full.item(), rel=1e-6)
        assert full.item() > info_nce(q, d, 0.05).item()  # the named negatives add to the loss
        # A masked negative counts for nothing: the loss of only the queries that have one.
        has = b.named
        by_hand = torch.nn.functional.cross_entropy(
            torch.cat([q @ d.T, torch.where(has, (q * negs).sum(-1), torch.tensor(float("-inf")))[:, None]], 1) / 0.05,
            torch.arange(32))
        assert full.item() == pytest.approx(by_hand.item(), rel=1e-6)
        for _ in range(4):
            run.trainer.inner_step()  # trains with them


def code_sets(state: Path, *extra: str) -> list[str]:
    """The code corpus of this repository's own sources: the default corpus's path, in seconds."""
    return ["train.task=twotower", f"twotower.code_paths={ROOT / 'daemon'}", "twotower.vocab_size=512",
            "twotower.embed_dim=32", "twotower.eval_queries=50", "train.batch_size=32",
            "train.effective_batch_size=32", "train.torch_threads=1", "upload.enabled=false",
            "telemetry.log_format=json", f"paths.state_dir={state}", *extra]


class TestCodePaths:
    def test_exact_resume_on_the_code_corpus(self, tmp_path: Path) -> None:
        """Stopped after 3 steps and resumed for 3 more, the weights equal 6 steps straight,
        with the ID embeddings (mining is asynchronous, so never bit-exact: off here)."""
        on = ("mining.enabled=false", "embeddings.enabled=true")
        straight = assert_exact_resume(lambda state: code_sets(state, *on), tmp_path, 3)
        assert straight.task.num_items > 200 and len(straight.task.corpus.eval_targets) > 0

    def test_a_code_path_that_is_not_a_directory(self, tmp_path: Path) -> None:
        code, out, err = cli("config", "validate", "--set", "train.task=twotower",
                             "--set", f"twotower.code_paths={tmp_path / 'nope'}")
        assert (code, err.strip()) == (2, f"config error: twotower.code_paths: not a directory "
                                          f"(got {str(tmp_path / 'nope')!r})"), out + err


class TestBadInput:
    def test_no_pairs_named(self) -> None:
        code, out, err = cli("config", "validate", "--set", "train.task=twotower", "--set", "twotower.corpus=pairs")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "twotower.pairs" in err, out + err

    def test_pairs_without_the_pairs_corpus(self, tmp_path: Path) -> None:
        path = write_jsonl(tmp_path / "p.jsonl", rows(10))
        code, out, err = cli("config", "validate", "--set", "train.task=twotower", "--set", f"twotower.pairs={path}")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "twotower.corpus=pairs" in err, out + err

    def test_a_bad_line_is_one_line_naming_file_and_line(self, tmp_path: Path) -> None:
        data = rows(50)
        path = write_jsonl(tmp_path / "p.jsonl", data)
        with path.open("a") as fh:
            fh.write('{"query": "q"}\n')  # no document
        code, out, err = cli("run", *[a for s in sets(tmp_path / "s", path, "api.enabled=false",
                                                      "telemetry.log_format=console") for a in ("--set", s)])
        assert code == 2, out + err
        lines = [line for line in (out + err).splitlines() if "config error" in line]
        assert len(lines) == 1 and f"line 51 of {path}" in lines[0], out + err
        assert "Traceback" not in out + err


@pytest.mark.integration
@pytest.mark.slow
class TestCodeCorpus:
    def test_the_default_trains_on_code_with_no_download(self, tmp_path: Path) -> None:
        """`make run ARGS="--set train.task=twotower"`: the code corpus of this machine's Python
        sources, tokenized once, trained on."""
        state = tmp_path / "s"
        args = [sys.executable, "-m", "daemon", "run", "--set", "train.task=twotower", "--set", "train.max_steps=3",
                "--set", f"paths.state_dir={state}", "--set", "api.enabled=false", "--set", "upload.enabled=false",
                "--set", "telemetry.log_format=json", "--set", "train.torch_threads=2"]
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900,
                              env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        made = [json.loads(line) for line in done.stdout.splitlines() + done.stderr.splitlines()
                if '"retrieval pairs tokenized"' in line]
        assert len(made) == 1 and made[0]["pairs"] >= 20_000 and made[0]["eval_queries"] > 0, made
        assert '"global_step": 3' in done.stdout + done.stderr
