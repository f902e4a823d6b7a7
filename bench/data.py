"""data: prepared token datasets: preparing them, starting on a large one, streaming one from a bucket.

One byte-level BPE of 4096 tokens is trained first (on every fourth file of the standard
library) and used for everything below.

- prepare_speedup: MB/s of text that ``prepare(..., workers=2)`` tokenises and cuts into
  shards over ``workers=1``, on the whole standard library of this Python (about 31 MB of
  .py files), each into a fresh destination, in alternating runs; the fastest run of each,
  since other processes' load slows the 2-worker runs most (goal >= 1.7 on 2 cores). Both
  spawn their worker processes (one tokenizer thread each) inside the timed call.
- startup_ratio_10x: seconds from starting ``minerd run`` (a subprocess, ``lm.dataset`` a
  local folder, ``train.max_steps=1``) to its first finished inner step, read as the moment
  the step's JSON log line (event "Outer Step: ...") reaches this process, with a dataset 10x
  larger over the base one (goal <= 1.2). The base is the standard library prepared above
  (1M-token shards); the 10x one is its shards copied ten times under new names with an
  index.json listing them all, so it is 10x the tokens and 10x the shards.
- rss_ratio_10x: the same runs' peak resident memory (``ru_maxrss`` of the child from
  ``wait4``, the whole run to its exit: start, one step, the stop checkpoint), 10x over base
  (goal <= 1.2).
- stream_over_local: training tokens/s in this process (``cpu_run``, the tiny preset, 8 x 64
  tokens a step, one torch thread) with ``lm.dataset=s3://...`` served by a moto server on
  this machine, through a shard cache of ``lm.cache_bytes`` = 3 shards (the least minerd
  accepts with ``lm.prefetch_shards=1``: the shard in use, the one ahead, one arriving), over
  the same dataset read from a local folder (goal >= 0.95). The dataset is three standard
  library packages (email, http, json) in 8192-token shards, so a shard lasts about 16
  steps and every timed block fetches several. Blocks of steps of the two runs alternate
  after a warm-up of each; medians.
- wait_fraction: the streaming run's data-wait seconds (``minerd_data_wait_seconds_total``,
  the trainer's time in ``get_batch``) over its seconds in the timed blocks (goal <= 0.02).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import structlog
import torch

import daemon.data.text.corpus as corpus
from bench._common import ROOT, free_port, interleaved, result
from daemon.data.prepared.dataset import locate, mismatched
from daemon.data.prepared.index import INDEX, TOKENIZER, Index, Shard, shard_name
from daemon.data.prepared.prepare import Tok, prepare
from daemon.data.text.build import tok_spec
from daemon.data.text.tokenizer import train_bpe, wrap
from daemon.run.local import cpu_run

VOCAB = 4096
BUCKET = "minerd-bench"
STREAM_PACKAGES = ("email", "http", "json")
STREAM_SHARD_TOKENS = 8192
# The smallest job that is still the real model: the tiny preset, 8 sequences of 64 tokens a
# step, evaluations and periodic checkpoints out of reach, one torch thread.
RUN_SETS = ["train.task=causal_lm", "lm.seq_len=64", "train.batch_size=8", "train.effective_batch_size=8",
            "lm.vocab_size=512", "lm.eval_sequences=16", "lm.eval_every_steps=1000000", "train.torch_threads=1",
            "train.inner_steps_per_outer=100000", "checkpoint.every_inner_steps=1000000", "upload.enabled=false",
            "api.enabled=false"]


def main(quick: bool) -> None:
    torch.set_num_threads(1)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        stdlib = corpus.discover([], "bench")
        t0 = time.perf_counter()
        hf = wrap(train_bpe((d.text for d in corpus.documents(stdlib[::4])), VOCAB))
        print(f"BPE of {VOCAB} tokens trained in {time.perf_counter() - t0:.1f} s")
        base = tmp / "base"
        speedup = prepare_speedup(tok_spec(hf, 0.01), base, tmp, quick)
        startup, rss = startup_ratios(base, tmp, quick)
        stream, wait = streaming(tok_spec(hf, 0.1), tmp, quick)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result("data", prepare_speedup=speedup, startup_ratio_10x=startup, rss_ratio_10x=rss, stream_over_local=stream,
           wait_fraction=wait)


# ---- prepare: 2 workers over 1 ---------------------------------------------------------
def prepare_speedup(tok: Tok, keep: Path, tmp: Path, quick: bool) -> float:
    # Reading every file once warms the page cache for both, and counts the text as prepare does.
    text_bytes = sum(len(d.text.encode("utf-8", "surrogatepass")) for d in corpus.documents(corpus.discover([], "b")))
    runs = [0]
    each: dict[int, list[float]] = {1: [], 2: []}

    def with_workers(n: int) -> Callable[[], None]:
        def go() -> None:
            runs[0] += 1
            dest = tmp / f"prepare-{runs[0]}"
            t0 = time.perf_counter()
            prepare([], str(dest), tok, shard_tokens=1 << 20, workers=n)
            each[n].append(time.perf_counter() - t0)
            if not keep.exists():
                dest.rename(keep)  # the base dataset of the start-up runs (the same bytes for any n)
            else:
                shutil.rmtree(dest)
        return go

    load = os.getloadavg()
    interleaved(with_workers(1), with_workers(2), 2 if quick else 4)
    # The fastest run of each: load from other processes only slows a run, and slows the
    # 2-worker runs most (they need both cores), so a median under a burst of load reads low.
    t1, t2 = min(each[1]), min(each[2])
    mb = text_bytes / 1e6
    index = locate("bench", str(keep)).index
    print(f"\nprepare: {mb:.1f} MB of text (the standard library), {index.tokens('train') + index.tokens('eval')} "
          f"tokens, {len(index.shards)} shards")
    print(f"{'workers':<10}{'fastest s':>10}{'MB/s':>10}")
    for n, t in ((1, t1), (2, t2)):
        print(f"{n:<10}{t:>10.2f}{mb / t:>10.2f}    runs: {', '.join(f'{x:.2f}' for x in each[n])}")
    print(f"load average before: {load[0]:.2f}, after: {os.getloadavg()[0]:.2f}")
    return t1 / t2


# ---- start-up: a dataset 10x larger ----------------------------------------------------
def tenfold(base: Path, dest: Path) -> None:
    """``base``'s shards copied ten times under new names, one index naming them all."""
    index = locate("bench", str(base)).index
    dest.mkdir()
    shutil.copyfile(base / TOKENIZER, dest / TOKENIZER)
    big = Index(index.tokenizer_sha256, index.dtype, index.eos, index.eval_fraction, index.shard_tokens,
                sources=list(index.sources))
    number = {"train": 0, "eval": 0}
    for _ in range(10):
        for s in index.shards:
            name = shard_name(s.split, number[s.split])
            number[s.split] += 1
            shutil.copyfile(base / s.name, dest / name)
            big.shards.append(Shard(name, s.split, s.tokens, s.bytes, s.sha256))
    (dest / INDEX).write_text(big.to_json())


def first_step(dataset: Path, state_dir: Path) -> tuple[float, float]:
    """(seconds from start to the first inner step's log line, peak RSS in MB) of ``minerd run``."""
    cmd = [sys.executable, "-m", "daemon", "run"]
    for s in [*RUN_SETS, f"paths.state_dir={state_dir}", f"lm.dataset={dataset}", "train.max_steps=1",
              "telemetry.log_format=json"]:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    seconds = None
    tail: list[str] = []
    for line in proc.stdout:
        if seconds is None and '"Outer Step:' in line:
            seconds = time.perf_counter() - t0
        tail = [*tail, line][-40:]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode or seconds is None:
        raise SystemExit(f"bench: minerd run on {dataset} failed ({proc.returncode}):\n{''.join(tail)}")
    shutil.rmtree(state_dir, ignore_errors=True)
    return seconds, usage.ru_maxrss / 1024  # kB on Linux


def startup_ratios(base: Path, tmp: Path, quick: bool) -> tuple[float, float]:
    big = tmp / "tenfold"
    tenfold(base, big)
    sizes = {p: sum(f.stat().st_size for f in p.iterdir()) / 1e6 for p in (base, big)}
    shards = {p: len(locate("bench", str(p)).index.shards) for p in (base, big)}
    # A local dataset under 256 MB is hashed at each start (data/prepared/dataset.py): what that costs.
    hashing = {}
    for p in (base, big):
        loc = locate("bench", str(p))
        t0 = time.perf_counter()
        assert not mismatched(loc)
        hashing[p] = time.perf_counter() - t0
    got: dict[Path, list[tuple[float, float]]] = {base: [], big: []}
    runs = [0]

    def start(dataset: Path) -> Callable[[], None]:
        def go() -> None:
            runs[0] += 1
            got[dataset].append(first_step(dataset, tmp / f"state-{runs[0]}"))
        return go

    first_step(base, tmp / "state-warm")  # the interpreter's and torch's files into the page cache
    interleaved(start(base), start(big), 2 if quick else 4)
    print(f"\nminerd run to its first inner step (median of {len(got[base])}), {'`--quick` ' if quick else ''}"
          "max_steps=1")
    print(f"{'dataset':<10}{'MB':>8}{'shards':>8}{'hash s':>8}{'first step s':>14}{'peak RSS MB':>13}")
    med = {}
    for p, label in ((base, "base"), (big, "10x")):
        med[p] = (statistics.median(x[0] for x in got[p]), statistics.median(x[1] for x in got[p]))
        print(f"{label:<10}{sizes[p]:>8.0f}{shards[p]:>8}{hashing[p]:>8.2f}{med[p][0]:>14.2f}{med[p][1]:>13.0f}")
    for p, label in ((base, "base"), (big, "10x")):
        print(f"  {label} runs: " + ", ".join(f"{s:.2f} s/{r:.0f} MB" for s, r in got[p]))
    shutil.rmtree(big, ignore_errors=True)
    return med[big][0] / med[base][0], med[big][1] / med[base][1]


# ---- streaming from a bucket against a local folder ------------------------------------
class Moto:
    """moto's S3 server as a subprocess on this machine, stopped by its own pid."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                          str(self.port)], stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise SystemExit(f"bench: the moto server did not come up (see {log_path})") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def streaming(tok: Tok, tmp: Path, quick: bool) -> tuple[float, float]:
    local = tmp / "stream"
    root = corpus.stdlib_root()
    prepare([str(root / p) for p in STREAM_PACKAGES], str(local), tok, shard_tokens=STREAM_SHARD_TOKENS, workers=0)
    index = locate("bench", str(local)).index
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL_S3"]}
    server = Moto(tmp / "moto.log")
    try:
        os.environ.update(env, AWS_ENDPOINT_URL_S3=server.url)
        import boto3

        s3 = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        for f in sorted(local.iterdir()):
            s3.upload_file(str(f), BUCKET, f"stdlib/{f.name}")
        return _stream_vs_local(local, f"s3://{BUCKET}/stdlib", index, tmp, quick)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stream_vs_local(local: Path, remote: str, index: Index, tmp: Path, quick: bool
                     ) -> tuple[float, float]:
    shard_bytes = max(s.bytes for s in index.shards)
    cache_bytes = 3 * shard_bytes
    runs = {}
    for name, dataset, extra in (("local", str(local), []),
                                 ("s3", remote, [f"lm.cache_dir={tmp / 'cache'}", f"lm.cache_bytes={cache_bytes}",
                                                 "lm.prefetch_shards=1"])):
        run, registry, _ = cpu_run([*RUN_SETS, f"paths.state_dir={tmp / ('state-' + name)}", f"lm.dataset={dataset}",
                                    *extra])
        run.trainer.model.train()
        runs[name] = (run, registry)
    steps = 40 if quick else 60
    rounds = 3 if quick else 6
    spent = {name: {"seconds": 0.0, "wait": 0.0} for name in runs}

    def waited(name: str) -> float:
        return float(runs[name][1].get_sample_value("minerd_data_wait_seconds_total") or 0.0)

    def block(name: str) -> Callable[[], None]:
        trainer = runs[name][0].trainer

        def go() -> None:
            w0, t0 = waited(name), time.perf_counter()
            for _ in range(steps):
                trainer.inner_step()
            spent[name]["seconds"] += time.perf_counter() - t0
            spent[name]["wait"] += waited(name) - w0
        return go

    for name in runs:  # warm-up: allocator, the first shards, the first fetch
        for _ in range(10):
            runs[name][0].trainer.inner_step()
    t_local, t_s3 = interleaved(block("local"), block("s3"), rounds)
    reader = runs["s3"][0].task.data.reader  # type: ignore[attr-defined]
    stats = reader.stats
    tokens = steps * 8 * 64
    train_shards = len(index.split("train"))
    print(f"\nstreaming: {train_shards} training shards of {STREAM_SHARD_TOKENS} tokens ({shard_bytes} bytes), "
          f"cache {cache_bytes} bytes (3 shards); blocks of {steps} steps x 512 tokens, {rounds} rounds")
    print(f"{'dataset':<10}{'s/step':>10}{'tokens/s':>12}")
    for label, t in (("local", t_local), ("s3", t_s3)):
        print(f"{label:<10}{t / steps:>10.4f}{tokens / t:>12.0f}")
    print(f"s3: {stats.fetches} fetches ({stats.fetch_seconds:.2f} s in the cache's thread, "
          f"{stats.fetch_bytes} bytes); cached at the end {reader.cached()}")
    for label, sp in spent.items():
        print(f"{label}: data wait {sp['wait']:.3f} s of {sp['seconds']:.1f} s timed")
    for run, _ in runs.values():
        run.task.data.reader.close()  # type: ignore[attr-defined]
    return t_local / t_s3, spent["s3"]["wait"] / spent["s3"]["seconds"]
