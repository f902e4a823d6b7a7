"""The checks, in the order they run. Each returns its rows; a check that crashes or runs out
of time is a FAIL row of its own and the others still run (``run_checks``)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.gpu_check import judge, prom
from bench.gpu_check.judge import NO_CUDA, event, median_of, model_millions, steps
from bench.gpu_check.plan import Plan, Shape
from bench.gpu_check.procs import Child, Children
from bench.gpu_check.table import Row, failed, judged, passed, skipped

MIN_SECONDS = 10  # a check given less than this is not started: it could prove nothing
LIVE_MAX_STEPS = 1_000_000  # the live miner runs until the check stops it
# minerd builds the model with the tokenizer's size or lm.vocab_size, whichever is larger; the
# dataset's BPE is trained to lm.vocab_size's default (8192), so that is the model's.
VOCAB = 8192


class OutOfTime(Exception):
    """The check's budget is spent: the checks still to come are reported, not run."""


@dataclass
class Ctx:
    plan: Plan
    out: Path
    kids: Children
    deadline: float
    env: dict[str, str]
    dataset: Path | None = None
    # What one check measured and a later one compares with.
    minerd: dict[str, dict[str, Any]] = field(default_factory=dict)
    bare: dict[str, dict[str, Any]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def timeout(self, want: float) -> float:
        left = self.deadline - time.monotonic()
        if left < MIN_SECONDS:
            raise OutOfTime("not run: the check's time budget is spent")
        return min(want, left)

    def progress(self, text: str) -> None:
        print(f"gpu_check: {text}", file=sys.stderr, flush=True)


def minerd_sets(ctx: Ctx, shape: Shape, state: Path, max_steps: int) -> list[str]:
    sets = [f"train.device={ctx.plan.device}", *shape.sets(), f"train.max_steps={max_steps}",
            f"paths.state_dir={state}", f"lm.dataset={ctx.dataset}", "upload.enabled=false", "api.port=0",
            "telemetry.log_format=json",
            # Evaluations and periodic checkpoints are not training steps: out of the measured span.
            "lm.eval_every_steps=1000000", "checkpoint.every_inner_steps=1000000"]
    if ctx.plan.threads:
        sets.append(f"train.torch_threads={ctx.plan.threads}")
    return sets


def as_args(sets: list[str]) -> list[str]:
    return [arg for s in sets for arg in ("--set", s)]


def start_minerd(ctx: Ctx, name: str, shape: Shape, max_steps: int, extra: tuple[str, ...] = (),
                 torchrun: bool = False) -> Child:
    if ctx.dataset is None:
        raise RuntimeError("no prepared dataset (the data check failed)")
    state = ctx.out / name / "state"
    prefix = [sys.executable, "-m", "daemon", "run"]
    if torchrun:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                  "-m", "daemon", "run"]
    cmd = prefix + as_args(minerd_sets(ctx, shape, state, max_steps) + list(extra))
    (ctx.out / name).mkdir(parents=True, exist_ok=True)
    (ctx.out / name / "command.txt").write_text(" ".join(cmd) + "\n")
    return ctx.kids.start(name, cmd, ctx.out / name / "minerd.log", ctx.env)


def drop_checkpoints(ctx: Ctx, name: str) -> None:
    # Logs are what --out keeps for inspection; a llama-1b checkpoint is tens of GB.
    shutil.rmtree(ctx.out / name / "state" / "checkpoints", ignore_errors=True)


def worker(ctx: Ctx, name: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Runs bench/gpu_check/worker.py on ``spec``; its result, or RuntimeError with the reason."""
    result = ctx.out / name / "result.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "result": str(result), "threads": ctx.plan.threads}
    child = ctx.kids.start(name, [sys.executable, "-m", "bench.gpu_check.worker", json.dumps(spec)],
                           ctx.out / name / "worker.log", ctx.env)
    rc = child.wait(timeout)
    if rc is None:
        child.stop(10)
        raise RuntimeError(f"timed out after {timeout:.0f} s: {child.tail(3)}")
    if rc != 0 or not result.exists():
        raise RuntimeError(f"exit {rc}: {child.tail(3)}")
    return dict(json.loads(result.read_text()))


def shape_spec(ctx: Ctx, shape: Shape) -> dict[str, Any]:
    return {"device": ctx.plan.device, "preset": shape.preset, "vocab": VOCAB, "seq_len": shape.seq_len,
            "batch": shape.batch, "accumulation": shape.accumulation, "lr": shape.lr, "weight_decay": 0.01,
            "grad_clip": 1.0, "amp": ctx.plan.amp, "warmup": shape.skip, "steps": shape.measure}


# --- 0. the data every run trains on --------------------------------------------------------
def check_dataset(ctx: Ctx) -> list[Row]:
    """The standard library's top-level modules prepared once (about 1.2M tokens, seconds):
    every run reads this dataset instead of preparing the whole library into its state dir."""
    name, out = "data: prepared dataset", ctx.out / "dataset"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    cmd = [sys.executable, "-m", "daemon", "data", "prepare", str(stdlib / "*.py"), "--out", str(out),
           "--workers", str(ctx.plan.prepare_workers), "--eval-fraction", "0.05"]
    child = ctx.kids.start("prepare", cmd, ctx.out / "prepare.log", ctx.env)
    t0 = time.monotonic()
    rc = child.wait(ctx.timeout(ctx.plan.run_timeout))
    if rc is None:
        child.stop(10)
    if rc != 0 or not (out / "index.json").exists():
        return [failed(name, f"exit {rc}: {child.tail(3)}", "minerd data prepare exits 0")]
    ctx.dataset = out
    found = re.search(r"([0-9]+) training and ([0-9]+) held-out tokens", child.text())
    tokens = f"{int(found.group(1)):,} training, {int(found.group(2)):,} held-out tokens" if found else "prepared"
    return [passed(name, f"{tokens} in {time.monotonic() - t0:.0f} s", "minerd data prepare exits 0")]


# --- 1. bf16 autocast and SDPA's fused kernels ---------------------------------------------
def check_kernel(ctx: Ctx) -> list[Row]:
    shape = ctx.plan.shapes[0]
    spec = {**shape_spec(ctx, shape), "job": "kernel", "batch": 4}
    got = worker(ctx, "kernel", spec, ctx.timeout(ctx.plan.worker_timeout))
    ctx.facts.update({k: got[k] for k in ("device_name", "torch", "cuda") if k in got})
    return judge.kernel_rows(ctx.plan.cuda, shape.preset, got)


# --- 2, 4, 5. the live miner: tokens/s, /metrics, NVML gauges, Grafana's GPU panels ---------
def check_live(ctx: Ctx) -> list[Row]:
    shape = ctx.plan.shapes[0]
    name = f"run {shape.preset}: trains, SIGTERM exits 0"
    expected = f"{shape.skip + shape.measure} step lines, exit 0"
    run = start_minerd(ctx, f"live-{shape.preset}", shape, LIVE_MAX_STEPS)
    rows: list[Row] = []
    trained = False
    try:
        if not run.wait_until(lambda r: event(r, "API listening") is not None, ctx.timeout(ctx.plan.start_timeout)):
            return [failed(name, f"no 'API listening' line: {run.tail(3)}", expected)]
        listening = event(run.records(), "API listening")
        assert listening is not None
        url = str(listening["url"])
        instance = url.removeprefix("http://")
        server: prom.Prometheus | None = None
        prom_error = None
        try:  # started now, so that it has scraped a few times when the panels are asked
            server = prom.Prometheus(ctx.kids, ctx.out / "prometheus", instance)
            server.wait_ready(30)
        except (FileNotFoundError, RuntimeError) as exc:
            prom_error = str(exc)
            if server is not None:
                server.stop()
                server = None
        try:
            want = shape.skip + shape.measure
            trained = run.wait_until(lambda r: len(steps(r)) >= want, ctx.timeout(ctx.plan.steps_timeout))
            rows += metrics_rows(ctx, url, ctx.out / f"live-{shape.preset}" / "metrics.txt")
            rows += grafana_rows(ctx, server, prom_error, instance)
        finally:
            if server is not None:
                server.stop()
    finally:
        rc = run.stop(60)
        drop_checkpoints(ctx, f"live-{shape.preset}")
    lines = steps(run.records())
    ctx.minerd[shape.preset] = {"lines": lines, "skip": shape.skip, "model": model_millions(run.records())}
    ok = trained and rc == 0
    return [judged(name, ok, f"{len(lines)} step lines, exit {rc}" + ("" if ok else f": {run.tail(2)}"),
                   expected), *rows]


def metrics_rows(ctx: Ctx, url: str, keep: Path) -> list[Row]:
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError as exc:
        return [failed("/metrics: served while training", f"GET {url}/metrics: {exc}", "200 with the minerd_ series")]
    keep.write_text(text)
    return judge.metrics_rows(ctx.plan.cuda, text)


def grafana_rows(ctx: Ctx, server: prom.Prometheus | None, prom_error: str | None, instance: str) -> list[Row]:
    expected = ">= 1 series per query"
    panels = prom.gpu_panels(json.loads(prom.DASHBOARD.read_text()))
    if not panels:
        return [failed("grafana: GPU panels", f"no GPU panel in {prom.DASHBOARD.name}", expected)]
    if server is None:
        return [skipped(f"grafana: {title}", str(prom_error), expected) for title, _ in panels]
    rows = []
    for title, exprs in panels:
        # On a CPU the GPU-only series are absent by design; what must still answer proves the plumbing.
        asked = [e for e in exprs if ctx.plan.cuda or not prom.GPU_ONLY.search(e)]
        if not asked:
            rows.append(skipped(f"grafana: {title}", f"{NO_CUDA} (its {len(exprs)} queries name GPU-only series)",
                                expected))
            continue
        try:
            answers = list(server.series([prom.fill(e, instance) for e in asked], timeout=20))
        except (OSError, RuntimeError, ValueError) as exc:
            rows.append(failed(f"grafana: {title}", f"{type(exc).__name__}: {exc}", expected))
            continue
        empty = [e for e, n in answers if n == 0]
        value = f"{len(asked) - len(empty)}/{len(asked)} queries answered"
        if empty:
            value += f"; empty: {empty[0]}"
        if len(asked) < len(exprs):
            value += f" ({len(exprs) - len(asked)} GPU-only not asked: {NO_CUDA})"
        rows.append(judged(f"grafana: {title}", not empty, value, expected))
    return rows


# --- 2. tokens/s and MFU against the bare loop ----------------------------------------------
def check_throughput(shape: Shape) -> Callable[[Ctx], list[Row]]:
    def check(ctx: Ctx) -> list[Row]:
        if shape.preset not in ctx.minerd:
            ctx.minerd[shape.preset] = measured_run(ctx, shape)
        try:
            bare = ctx.bare[shape.preset] = worker(ctx, f"bare-{shape.preset}",
                                                   {**shape_spec(ctx, shape), "job": "bare"},
                                                   ctx.timeout(ctx.plan.worker_timeout))
        except RuntimeError as exc:
            return [failed(f"tokens/s {shape.preset}: minerd / bare", f"bare loop: {exc}", "the bare loop runs")]
        return judge.throughput_rows(ctx.plan.cuda, shape.preset, ctx.minerd[shape.preset], bare)

    return check


def measured_run(ctx: Ctx, shape: Shape) -> dict[str, Any]:
    """minerd on ``shape`` until its measured step lines are in; then it is killed: its stop
    checkpoint (llama-1b: weights, AdamW moments and the outer state in fp32, over 20 GB)
    measures nothing here and would take a good part of the budget."""
    name = f"run-{shape.preset}"
    want = shape.skip + shape.measure
    run = start_minerd(ctx, name, shape, want + 2)
    try:
        run.wait_until(lambda r: len(steps(r)) >= want, ctx.timeout(ctx.plan.start_timeout + ctx.plan.steps_timeout))
    finally:
        run.stop(0, sig=signal.SIGKILL)
        drop_checkpoints(ctx, name)
    records = run.records()
    return {"lines": steps(records), "skip": shape.skip, "model": model_millions(records)}


# --- 7. peak memory against minerd diagnose's memory plan -----------------------------------
def check_memory(ctx: Ctx) -> list[Row]:
    shape = ctx.plan.shapes[-1]
    name = f"diagnose-{shape.preset}"
    sets = [s for s in minerd_sets(ctx, shape, ctx.out / name / "state", 1) if not s.startswith("train.max_steps")]
    cmd = [sys.executable, "-m", "daemon", "diagnose", "--world-size", "1", "--json", *as_args(sets)]
    child = ctx.kids.start(name, cmd, ctx.out / name / "diagnose.log", ctx.env)
    rc = child.wait(ctx.timeout(ctx.plan.worker_timeout))
    if rc is None:
        child.stop(10)
    report = judge.diagnose_json(child.text()) if rc == 0 else None
    failure = f"exit {rc}: {child.tail(2)}" if rc != 0 else None
    lines = (ctx.minerd.get(shape.preset) or {}).get("lines", [])
    minerd_gb = max((float(r.get("gpu_mem_gb", 0)) for r in lines), default=0.0)
    peak = (ctx.bare.get(shape.preset) or {}).get("peak_bytes")
    return judge.memory_rows(ctx.plan.cuda, shape.preset, report, failure, peak, minerd_gb)


# --- 3. FSDP on one rank --------------------------------------------------------------------
def check_fsdp(ctx: Ctx) -> list[Row]:
    shape, backend = ctx.plan.shapes[0], ctx.plan.backend
    row_name = f"fsdp: torchrun, 1 rank ({backend})"
    expected = f"exit 0, {ctx.plan.fsdp_steps} steps, 'Sharding: fsdp over 1 ranks:', {backend}"
    run = start_minerd(ctx, f"fsdp-{shape.preset}", shape, ctx.plan.fsdp_steps, ("train.sharding=fsdp",),
                       torchrun=True)
    rc = run.wait(ctx.timeout(ctx.plan.run_timeout))
    if rc is None:
        run.stop(30)
    drop_checkpoints(ctx, f"fsdp-{shape.preset}")
    records = run.records()
    line = event(records, "Sharding: fsdp over 1 ranks:")
    group = event(records, "process group ready")
    used = str(group.get("backend")) if group else "no process group"
    done = len(steps(records))
    ok = rc == 0 and line is not None and done >= ctx.plan.fsdp_steps and used == backend
    said = str(line["event"]) if line else "no 'Sharding: fsdp over 1 ranks:' line"
    tail = "" if rc == 0 else f": {run.tail(2)}"
    return [judged(row_name, ok, f"exit {rc}, {done} steps, {used}; {said}{tail}", expected)]


# --- 6. torch.compile ------------------------------------------------------------------------
def check_compile(ctx: Ctx) -> list[Row]:
    shape = ctx.plan.shapes[0]
    row_name = f"compile: tokens/s compiled / eager ({shape.preset})"
    expected = "trains, exit 0 (ratio reported)"
    want = ctx.plan.compile_skip + shape.measure
    name = f"compile-{shape.preset}"
    run = start_minerd(ctx, name, shape, want, ("train.compile=true",))
    rc = run.wait(ctx.timeout(ctx.plan.compile_timeout))
    if rc is None:
        run.stop(30)
    drop_checkpoints(ctx, name)
    lines = steps(run.records())
    compiled = median_of(lines, "tokens_per_s", ctx.plan.compile_skip)
    eager_run = ctx.minerd.get(shape.preset)
    eager = median_of(eager_run["lines"], "tokens_per_s", eager_run["skip"]) if eager_run else None
    first = f"first step {float(lines[0]['step_seconds']):.1f} s" if lines and "step_seconds" in lines[0] else ""
    ratio = f"{compiled / eager:.2f}x" if compiled and eager else "ratio n/a"
    value = (f"{ratio} (compiled {judge.fmt_tokens(compiled)}, eager {judge.fmt_tokens(eager)} tokens/s; {first}), "
             f"exit {rc}")
    ok = rc == 0 and len(lines) >= want
    return [judged(row_name, ok, value if ok else f"{value}: {run.tail(2)}", expected)]


def checks(plan: Plan) -> list[tuple[str, Callable[[Ctx], list[Row]]]]:
    """The checks in the order they run: each later one may use what an earlier one measured."""
    return [
        ("data", check_dataset),
        ("sdpa kernel", check_kernel),
        ("live miner", check_live),
        *[(f"throughput {shape.preset}", check_throughput(shape)) for shape in plan.shapes],
        ("memory plan", check_memory),
        ("fsdp", check_fsdp),
        ("compile", check_compile),
    ]


def run_checks(ctx: Ctx) -> list[Row]:
    rows: list[Row] = []
    for name, check in checks(ctx.plan):
        ctx.progress(f"{name} ...")
        t0 = time.monotonic()
        try:
            got = check(ctx)
        except OutOfTime as exc:
            got = [failed(name, str(exc), "runs within the budget")]
        except Exception as exc:  # a check that breaks is its own FAIL row: the others must still run
            got = [failed(name, f"crashed: {type(exc).__name__}: {exc}", "no crash")]
        rows += got
        bad = sum(r.status == "FAIL" for r in got)
        ctx.progress(f"{name}: {len(got)} rows, {bad} failed, {time.monotonic() - t0:.0f} s")
    return rows
