"""From what the runs said to the table's rows: reading minerd's logs, /metrics and
``diagnose --json``, and the thresholds. No process and no torch here, so that the GPU
branches, which this project's machines cannot run, are tested on synthetic input."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.gpu_check.table import Row, failed, judged, passed, skipped

Records = list[dict[str, Any]]

NO_CUDA = "no CUDA"
MIN_RATIO = 0.8  # minerd's tokens/s over the bare loop's, on a GPU
GB = 1e9


# --- minerd's JSON log lines ------------------------------------------------------------------
def steps(records: Records) -> Records:
    """The step lines (daemon/telemetry.py StepReporter) of tasks that count tokens."""
    return [r for r in records if "global_step" in r and "tokens_per_s" in r]


def event(records: Records, prefix: str) -> dict[str, Any] | None:
    return next((r for r in records if str(r.get("event", "")).startswith(prefix)), None)


def median_of(lines: Records, key: str, skip: int) -> float | None:
    values = [float(r[key]) for r in lines[skip:] if isinstance(r.get(key), int | float)]
    return statistics.median(values) if values else None


def model_millions(records: Records) -> str | None:
    """The parameter count in minerd's diagnostics block ("Model: LlamaForCausalLM (5.26M parameters)")."""
    found = event(records, "Model: ")
    match = re.search(r"\(([0-9.]+)M parameters\)", str(found.get("event", ""))) if found else None
    return match.group(1) if match else None


def fmt_tokens(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


# --- 1. the attention kernel ------------------------------------------------------------------
def kernel_rows(cuda: bool, preset: str, got: Mapping[str, Any]) -> list[Row]:
    """``got``: the worker's kernel job (bench/gpu_check/worker.py)."""
    ops, events = got["attention_ops"], ", ".join(got["attention_events"][:3]) or "none"
    name, expected = "sdpa: fused attention kernel (bf16)", "flash or mem-efficient SDPA, not math"
    if not cuda:
        kernel = skipped(name, f"{NO_CUDA} (the CPU ran: {events})", expected)
    else:
        # Forced to flash/efficient, an error means SDPA would have fallen back to math; the
        # profiler then says what it picks unforced, as minerd runs it (math there is a FAIL too).
        forced, profiler = got["forced_error"], got.get("profiler_error")
        fused = [op for op in ops if op != "math"]
        seen = bool(fused) and "math" not in ops
        value = f"forced flash/efficient raised: {forced}; " if forced else "forced flash/efficient ran; "
        value += f"profiler failed ({profiler})" if profiler else f"{'+'.join(ops) or 'no SDPA op seen'} ({events})"
        kernel = judged(name, not forced and (seen or profiler is not None), value, expected)
    dtype = got["logits_dtype"]
    return [kernel, judged(f"autocast: logits dtype ({preset})", dtype == "bfloat16", dtype, "bfloat16")]


# --- 4. /metrics and the NVML gauges ----------------------------------------------------------
def metrics_rows(cuda: bool, text: str) -> list[Row]:
    """The miner's /metrics while it trains: served, and on a GPU its memory and NVML gauges."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))

    def one(metric: str) -> float | None:
        got = samples.get(metric)
        return got[0][1] if got else None

    on_gpu, done = one("minerd_model_on_accelerator"), one("minerd_inner_steps_total")
    want = 1.0 if cuda else 0.0
    rows = [judged("/metrics: served while training", "minerd_info" in samples and on_gpu == want and (done or 0) > 0,
                   f"{len(samples)} series; model_on_accelerator={on_gpu}, inner_steps_total={done}",
                   f"minerd_info, model_on_accelerator={want:g}, steps > 0")]
    mem_expected, util_expected, temp_expected = (
        "allocated > 0, reserved >= allocated, total >= reserved", "0..1 (NVML)", "> 0 where reported")
    if not cuda:
        gpu = sorted(k for k in samples if k.startswith("minerd_gpu_"))
        why = f"{NO_CUDA} (GPU series served: {', '.join(gpu) or 'none, as documented'})"
        return [*rows, skipped("nvml: GPU memory gauges", why, mem_expected),
                skipped("nvml: utilisation gauge", NO_CUDA, util_expected),
                skipped("nvml: temperature", NO_CUDA, temp_expected)]
    by_device: dict[str, dict[str, float]] = {}
    for kind in ("allocated", "reserved", "total"):
        for labels, value in samples.get(f"minerd_gpu_memory_{kind}_bytes", []):
            by_device.setdefault(labels.get("device", "?"), {})[kind] = value
    mem_ok = bool(by_device) and all(
        {"allocated", "reserved", "total"} <= set(d) and 0 < d["allocated"] <= d["reserved"] <= d["total"]
        for d in by_device.values())
    mem_value = "; ".join(f"{dev} " + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in d.items())
                          for dev, d in by_device.items()) or "minerd_gpu_memory_*_bytes absent"
    util = samples.get("minerd_gpu_utilization_ratio", [])
    util_value = ", ".join(f"{labels.get('device', '?')} {v:.2f}" for labels, v in util) or (
        "absent: minerd could not read NVML (nvidia-ml-py, the driver's libnvidia-ml)")
    rows += [judged("nvml: GPU memory gauges", mem_ok, mem_value, mem_expected),
             judged("nvml: utilisation gauge", bool(util) and all(0 <= v <= 1 for _, v in util), util_value,
                    util_expected)]
    temps = [(k, v) for k, series in samples.items() if "temperature" in k for _, v in series]
    if not temps:
        rows.append(skipped("nvml: temperature", "minerd exports no temperature gauge", temp_expected))
    else:
        rows.append(judged("nvml: temperature", all(v > 0 for _, v in temps),
                           ", ".join(f"{k}={v:g}" for k, v in temps), temp_expected))
    return rows


# --- 2. tokens/s and MFU ----------------------------------------------------------------------
def throughput_rows(cuda: bool, preset: str, minerd: Mapping[str, Any], bare: Mapping[str, Any]) -> list[Row]:
    """``minerd``: its step lines, how many are warm-up, the model size its diagnostics block
    gave; ``bare``: the worker's bare job."""
    ratio_name, mfu_name = f"tokens/s {preset}: minerd / bare", f"mfu {preset}"
    expected = f">= {MIN_RATIO}" if cuda else "report (2 shared cores drift 2x: no threshold)"
    mfu_expected = "reported, 0 < mfu <= 1"
    minerd_tps = median_of(minerd["lines"], "tokens_per_s", minerd["skip"])
    minerd_mfu = median_of(minerd["lines"], "mfu", minerd["skip"])
    bare_tps = float(bare["tokens_per_s"])
    model = f"{bare['parameters'] / 1e6:.2f}"
    # Comparing different models would measure nothing: the bare loop builds its own from the preset.
    same_model = minerd["model"] in (None, model)
    value = f"minerd {fmt_tokens(minerd_tps)}, bare {fmt_tokens(bare_tps)} tokens/s"
    if minerd_tps is None:
        rows = [failed(ratio_name, f"{value}: too few minerd step lines ({len(minerd['lines'])})", expected)]
    else:
        ratio = minerd_tps / bare_tps
        ok = same_model and (ratio >= MIN_RATIO if cuda else ratio > 0)
        differs = "" if same_model else f"; models differ: minerd {minerd['model']}M, bare {model}M parameters"
        rows = [judged(ratio_name, ok, f"{ratio:.3f} ({value}){differs}", expected)]
    if not cuda:
        return [*rows, skipped(mfu_name, NO_CUDA, mfu_expected)]
    bare_mfu = f"bare {bare['mfu']:.3f}" if bare.get("mfu") is not None else "bare n/a"
    if minerd_mfu is None:
        return [*rows, failed(mfu_name, f"no mfu in minerd's step lines ({bare_mfu}): a GPU daemon/gpu.py does not "
                              "know? set telemetry.peak_tflops", mfu_expected)]
    return [*rows, judged(mfu_name, 0 < minerd_mfu <= 1, f"{minerd_mfu:.3f} ({bare_mfu})", mfu_expected)]


# --- 7. the memory plan -----------------------------------------------------------------------
def diagnose_json(text: str) -> dict[str, Any] | None:
    """The JSON object ``minerd diagnose --json`` printed, among whatever log lines came with it."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"(?m)^\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(obj, dict) and "cuda_available" in obj:
            return obj
    return None


def planned_device_bytes(memory_plan: Any) -> int | None:
    """The plan's bytes on one rank's device (``device_total``: the larger of the inner step's
    peak and the outer step's, daemon/memory_plan.py); None when the plan does not say."""
    total = memory_plan.get("device_total") if isinstance(memory_plan, dict) else None
    return total if isinstance(total, int) and not isinstance(total, bool) and total > 0 else None


def memory_rows(cuda: bool, preset: str, report: Mapping[str, Any] | None, failure: str | None,
                peak: int | None, minerd_gb: float) -> list[Row]:
    """``report``: diagnose's JSON (``failure`` says why there is none); ``peak``: the bare
    loop's torch.cuda.max_memory_allocated; ``minerd_gb``: the most its step lines said allocated."""
    plan_name, peak_name = "memory: plan (diagnose --world-size 1 --json)", f"memory: peak vs plan ({preset})"
    plan_expected, peak_expected = "a memory_plan with its device_total", "measured <= planned <= 2x measured"
    memory_plan = report.get("memory_plan") if report else None
    planned = planned_device_bytes(memory_plan)
    if failure is not None:
        plan_row = failed(plan_name, failure, plan_expected)
    elif memory_plan is None:
        plan_row = failed(plan_name, "no memory_plan in diagnose --json (not implemented yet?)", plan_expected)
    elif planned is None:
        keys = ", ".join(memory_plan) if isinstance(memory_plan, dict) else type(memory_plan).__name__
        plan_row = failed(plan_name, f"memory_plan has no device_total (keys: {keys})", plan_expected)
    else:
        plan_row = passed(plan_name, f"device_total {planned / GB:.2f} GB per rank, fits: {memory_plan.get('fits')}",
                          plan_expected)
    if not cuda:
        return [plan_row, skipped(peak_name, NO_CUDA, peak_expected)]
    if planned is None or not peak:
        why = "no plan to compare with" if planned is None else "no peak measured (the bare loop failed)"
        return [plan_row, failed(peak_name, why, peak_expected)]
    # minerd reports allocated and reserved memory, not a peak: the bare loop's
    # torch.cuda.max_memory_allocated stands in (it holds minerd's outer state too).
    return [plan_row, judged(peak_name, peak <= planned <= 2 * peak,
                             f"bare loop's max_memory_allocated {peak / GB:.2f} GB (minerd reports no peak; its step "
                             f"lines: {minerd_gb:.2f} GB allocated), planned {planned / GB:.2f} GB, planned/measured "
                             f"{planned / peak:.2f}", peak_expected)]
