"""exchange: training together through a bucket (an S3 endpoint on this machine: moto), against
DiLoCo over torchrun with the same inner steps, outer optimizer and codec.

The tiny language model on three standard-library packages (email, http, json), 8 x 64 tokens
a step, one torch thread per process, rounds of ``H`` inner steps (5; 3 with ``--quick``).
The miners and the aggregator run in this process, stepped round by round: each miner trains
until it has submitted, the aggregator closes the round, each miner trains on until it has
loaded the next global revision (one inner step, as a real miner that never waits).

- loss_ratio_vs_diloco: the global held-out loss after 8 rounds (4 with ``--quick``) of 3
  miners (disjoint data slices: ``lm.replicas=3``) over the held-out loss of a ``torchrun``
  DiLoCo run of 3 ranks for the same number of outer steps, ``train.outer_compression`` the
  upload codec (goal <= 1.03: the same algorithm, another transport; DiLoCo's compressed
  average carries error feedback, a submission does not).
- harmful_accepted: over the same rounds with a fourth miner at ``train.lr=1.0`` (diverging)
  and a fifth that re-submits the first miner's artifact under its own id each round: how many
  of their submissions the aggregator accepted (goal 0).
- catchup_seconds: a miner checkpointed, then left out for 3 rounds, started again from its
  checkpoint: seconds until the aggregator has accepted its next submission (report).
- bytes_per_round: bytes of the pseudo-gradient files of one round's three honest submissions.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog
import torch

from bench._common import minerd_events, result
from bench.data import Moto
from daemon.engine.protocols import StopSignal
from daemon.run.aggregate import build_aggregator
from daemon.run.catalog import load_config
from daemon.run.local import NeverStop, cpu_run
from daemon.state import MinerState
from daemon.sync.exchange.aggregator import Aggregator
from daemon.sync.exchange.layout import MANIFEST, dumps, file_entry, submission_folder
from daemon.sync.exchange.miner import ExchangeMiner

BUCKET = "minerd-bench-exchange"
CORPUS = [str(Path(sysconfig.get_paths()["stdlib"]) / p) for p in ("email", "http", "json")]


def base_sets(state: Path, h: int) -> list[str]:
    return [f"paths.state_dir={state}", "train.task=causal_lm", f"lm.corpus=[{', '.join(CORPUS)}]",
            "lm.vocab_size=1024", "lm.seq_len=64", "train.batch_size=8", "train.effective_batch_size=8",
            "lm.eval_sequences=32", "lm.eval_fraction=0.1", "train.torch_threads=1",
            f"train.inner_steps_per_outer={h}", "upload.enabled=false", "api.enabled=false",
            "telemetry.log_format=json", "telemetry.log_level=warning", "checkpoint.every_inner_steps=100000",
            "train.warmup_steps=10", "train.seed=7"]


class Miner:
    def __init__(self, tmp: Path, name: str, h: int, target: str, *extra: str, resume: bool = False) -> None:
        sets = [*base_sets(tmp / name, h), "exchange.enabled=true", f"exchange.target={target}",
                f"exchange.miner_id={name}", "exchange.poll_seconds=0.001", *extra]
        self.run = cpu_run(sets).run
        self.trainer = self.run.trainer
        outer = self.run.outer
        assert isinstance(outer, ExchangeMiner)
        self.exchange = outer
        if resume:
            self.trainer.resume()
        stop: StopSignal = NeverStop()
        self.exchange.join(stop, None)  # type: ignore[arg-type]

    def train_round(self) -> None:
        """Inner steps until this round is submitted."""
        while not self.exchange.submitted:
            self.trainer.inner_step()

    def follow(self) -> None:
        base = self.exchange.base
        while self.exchange.base == base:
            self.trainer.inner_step()


def copy_submission(target: Path, round_: int, src: str, name: str) -> None:
    """What a copier does: another miner's artifact under its own id, written after it."""
    folder = target / submission_folder(round_, name)
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(target / submission_folder(round_, src), folder)
    record = json.loads((folder / "submission.json").read_text())
    (folder / "submission.json").write_bytes(dumps({**record, "miner_id": name}))
    names = [p.name for p in folder.iterdir() if p.name != MANIFEST]
    (folder / MANIFEST).write_bytes(dumps({"format": 1, "files": {n: file_entry(folder / n) for n in names}}))


def aggregator(tmp: Path, h: int, target: str) -> Aggregator:
    cfg = load_config(sets=[*base_sets(tmp / "aggregator", h), "exchange.enabled=true",
                            f"exchange.target={target}", "exchange.miner_id=aggregator"], environ={})
    agg = build_aggregator(cfg, MinerState(task="causal_lm"), torch.device("cpu"))
    agg.open()
    return agg


def exchange_run(tmp: Path, h: int, rounds: int, target: str, local: Path | None, harmful: bool
                 ) -> tuple[float, int, list[int]]:
    """(global held-out loss after ``rounds``, harmful submissions accepted, bytes a round)."""
    agg = aggregator(tmp, h, target)
    honest = [Miner(tmp, f"m{i}", h, target, "lm.replicas=3", f"lm.replica={i}") for i in range(3)]
    wild = Miner(tmp, "wild", h, target, "train.lr=1.0", "train.warmup_steps=0", "train.grad_clip=0") \
        if harmful else None
    accepted_harmful, sizes = 0, []
    for r in range(rounds):
        for m in honest + ([wild] if wild else []):
            m.train_round()
        if harmful and local is not None:
            copy_submission(local, r, "m0", "copier")
        verdicts = agg.close()
        accepted_harmful += sum(v.accepted for v in verdicts if v.miner in ("wild", "copier"))
        sizes.append(sum(v.bytes for v in verdicts if v.miner.startswith("m")))
        for m in honest + ([wild] if wild else []):
            m.follow()
    return agg.evaluate(agg.model), accepted_harmful, sizes


def diloco_loss(tmp: Path, h: int, rounds: int) -> float:
    sets = [*base_sets(tmp / "diloco", h), "train.sync=diloco", "train.outer_compression=dct_topk",
            "train.effective_batch_size=24",  # 8 a rank, as each miner's 8
            f"train.max_steps={h * rounds}", f"lm.eval_every_steps={h * rounds}", "telemetry.log_level=info"]
    events = minerd_events(sets, 3, "DiLoCo over torchrun", timeout=1200)
    evals = [e for e in events if str(e.get("event", "")).startswith("Eval @ step") and "loss" in e]
    return float(evals[-1]["loss"])


def catchup(tmp: Path, h: int, target: str) -> float:
    agg = aggregator(tmp, h, target)
    others = [Miner(tmp, f"o{i}", h, target) for i in range(2)]
    late = Miner(tmp, "late", h, target)
    for m in [*others, late]:
        m.train_round()
    agg.close()
    for m in [*others, late]:
        m.follow()
    late.trainer.checkpoint("stop")
    del late
    for _ in range(3):  # it is down for three rounds
        for m in others:
            m.train_round()
        agg.close()
        for m in others:
            m.follow()
    t0 = time.perf_counter()
    back = Miner(tmp, "late", h, target, resume=True)
    while True:
        for m in [*others, back]:
            m.train_round()
        verdicts = {v.miner: v for v in agg.close()}
        if verdicts.get("late") is not None and verdicts["late"].accepted:
            return time.perf_counter() - t0
        for m in [*others, back]:
            m.follow()
        if time.perf_counter() - t0 > 600:
            return float("nan")


def main(quick: bool) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    torch.set_num_threads(1)
    h, rounds = (3, 4) if quick else (5, 8)
    tmp = Path(tempfile.mkdtemp(prefix="bench-exchange-"))
    moto = Moto(tmp / "moto.log")
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": moto.url}
    os.environ.update(env)
    try:
        import boto3

        boto3.client("s3", endpoint_url=moto.url).create_bucket(Bucket=BUCKET)
        t0 = time.perf_counter()
        loss, _, sizes = exchange_run(tmp / "ex", h, rounds, f"s3://{BUCKET}/honest", None, harmful=False)
        t_ex = time.perf_counter() - t0
        t0 = time.perf_counter()
        d_loss = diloco_loss(tmp / "dl", h, rounds)
        t_dl = time.perf_counter() - t0
        # The harmful run on a directory: the copier copies files the way anyone with write access would.
        local = tmp / "harm-target"
        _, harmful, _ = exchange_run(tmp / "harm", h, rounds, str(local), local, harmful=True)
        seconds = catchup(tmp / "cu", h, f"s3://{BUCKET}/catchup")
    finally:
        moto.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    info: dict[str, Any] = {"rounds": rounds, "inner_steps_per_round": h}
    print(f"exchange: {info}; held-out loss {loss:.4f} in {t_ex:.0f} s (3 miners + aggregator in one process)")
    print(f"DiLoCo over torchrun (3 ranks): held-out loss {d_loss:.4f} in {t_dl:.0f} s")
    print(f"bytes per round (3 honest submissions): {sizes}")
    result("exchange", loss_ratio_vs_diloco=loss / d_loss, harmful_accepted=harmful, catchup_seconds=seconds,
           bytes_per_round=statistics.mean(sizes))
