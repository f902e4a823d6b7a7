"""bench/gpu_check: the GPU check's answer without CUDA, its table and exit code, what it reads
from minerd, and its CPU rehearsal end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from bench.gpu_check import cli, judge, prom
from bench.gpu_check.table import FAIL, PASS, SKIP, Row, Status, exit_code, failed, passed, render, skipped
from daemon.gpu import GpuProbe, GpuStats
from daemon.metrics import build_core_metrics
from daemon.state import MinerState

ROOT = Path(__file__).resolve().parent.parent


class TestWithoutCuda:
    """Without a CUDA device and without --cpu-rehearsal, the check says so in one line and exits 2."""

    def test_one_line_and_exit_2(self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine that has one
        assert cli.main([]) == 2
        out = capsys.readouterr()
        assert out.out.splitlines() == [cli.NO_CUDA_LINE]
        assert out.err == ""

    @pytest.mark.integration
    def test_module_entry_point(self) -> None:
        """What `make gpu-check` runs, with the GPUs hidden."""
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)
        assert (out.returncode, out.stdout) == (2, cli.NO_CUDA_LINE + "\n"), out.stderr


class TestTable:
    """One Markdown table whose columns line up; exit 1 exactly when a check failed."""

    ROWS = (
        passed("tokens/s small: minerd / bare", "0.93 (minerd 120,000, bare 129,000 tokens/s)", ">= 0.8"),
        skipped("nvml: temperature", "minerd exports no temperature gauge", "> 0 where reported"),
        failed("fsdp: torchrun, 1 rank (nccl)", "exit 1: a | pipe\nand a newline", "exit 0"),
    )

    def test_one_aligned_markdown_table(self) -> None:
        lines = render(self.ROWS).splitlines()
        assert len(lines) == 2 + len(self.ROWS)
        assert [c.strip() for c in lines[0].strip("|").split("|")] == ["check", "value", "expected", "result"]
        assert set(lines[1]) <= {"|", "-"}
        assert len({len(line) for line in lines}) == 1  # every line as wide: the columns line up
        assert [line.rstrip(" |").rsplit(" ", 1)[-1] for line in lines[2:]] == [PASS, SKIP, FAIL]

    def test_a_cell_stays_one_cell_on_one_line(self) -> None:
        long = passed("x", "y" * 500, "z")
        lines = render([self.ROWS[2], long]).splitlines()
        assert len(lines) == 4
        assert all(line.count("|") == 5 for line in lines)
        assert "a / pipe and a newline" in lines[2]
        assert "..." in lines[3] and len(lines[3]) < 300

    @pytest.mark.parametrize(("statuses", "code"), [
        ([PASS, PASS], 0), ([PASS, SKIP], 0), ([SKIP], 0), ([PASS, FAIL, SKIP], 1), ([FAIL], 1), ([], 1),
    ])
    def test_exit_code(self, statuses: list[Status], code: int) -> None:
        rows = [Row(f"c{i}", "v", "e", s) for i, s in enumerate(statuses)]
        assert exit_code(rows) == code


class TestWhatItReads:
    """The step lines, the diagnose JSON among log lines, the memory plan's total and the
    dashboard's GPU panels are read as minerd and deploy/ write them."""

    def test_the_dashboards_gpu_panels(self) -> None:
        panels = dict(prom.gpu_panels(json.loads(prom.DASHBOARD.read_text())))
        assert {"GPU memory", "GPU utilisation", "Model on accelerator", "MFU"} <= set(panels)
        assert "Loss" not in panels
        for exprs in panels.values():
            for expr in exprs:
                filled = prom.fill(expr, "127.0.0.1:9108")
                assert "$" not in filled and 'instance="127.0.0.1:9108"' in filled

    def test_fill_refuses_an_unknown_variable(self) -> None:
        with pytest.raises(ValueError, match=r"\$job"):
            prom.fill('up{job="$job"}', "127.0.0.1:1")

    def test_diagnose_json_among_log_lines(self) -> None:
        text = ('{"event": "dataset", "level": "info"}\nwarming up\n'
                '{\n  "cuda_available": true,\n  "memory_plan": {"device_total": 30000000000, "fits": true}\n}\n')
        report = judge.diagnose_json(text)
        assert report is not None
        assert judge.planned_device_bytes(report["memory_plan"]) == 30_000_000_000
        assert judge.diagnose_json('{"event": "no report here"}\n') is None

    @pytest.mark.parametrize("plan", [None, {}, {"device_total": 0}, {"device_total": True}, [1, 2]])
    def test_a_plan_without_a_device_total(self, plan: object) -> None:
        assert judge.planned_device_bytes(plan) is None

    def test_medians_leave_the_warm_up_out(self) -> None:
        lines: list[dict[str, Any]] = [{"global_step": i, "tokens_per_s": v, "mfu": 0.4}
                                       for i, v in enumerate([1.0, 2.0, 10.0, 11.0, 12.0])]
        records: list[dict[str, Any]] = [{"event": "API listening", "url": "http://127.0.0.1:1"}, *lines,
                                         {"event": "training stopped"}]
        assert judge.steps(records) == lines
        assert judge.median_of(lines, "tokens_per_s", 2) == 11.0
        assert judge.median_of(lines, "missing", 0) is None
        assert judge.model_millions([{"event": "Model: LlamaForCausalLM (5.26M parameters)"}]) == "5.26"


class FakeH200Probe(GpuProbe):
    """The GPU probe's seam with one device in it, as torch.cuda and NVML would report an H200."""

    def __init__(self, utilization: float | None) -> None:
        super().__init__()
        self.utilization = utilization

    def devices(self) -> list[GpuStats]:
        return [GpuStats("cuda:0", "NVIDIA H200", 5_000_000_000, 8_000_000_000, 150_000_000_000, self.utilization)]


class TestGpuVerdicts:
    """The branches only a GPU reaches, judged on what a GPU run would say: thresholds hold
    where they should and a missing fact is a FAIL with its reason, never a crash."""

    def metrics_text(self, utilization: float | None) -> str:
        registry = CollectorRegistry()
        state = MinerState(task="causal_lm")
        state.model_on_accelerator = True
        build_core_metrics(registry, state, FakeH200Probe(utilization)).inner_steps.inc()
        return generate_latest(registry).decode()

    def test_metrics_with_nvml(self) -> None:
        rows = {r.check: r for r in judge.metrics_rows(True, self.metrics_text(0.93))}
        assert [r.status for r in rows.values()] == [PASS, PASS, PASS, SKIP]
        assert "cuda:0 0.93" in rows["nvml: utilisation gauge"].value
        assert "allocated 5.00 GB" in rows["nvml: GPU memory gauges"].value
        assert rows["nvml: temperature"].value == "minerd exports no temperature gauge"

    def test_metrics_without_nvml(self) -> None:
        rows = {r.check: r for r in judge.metrics_rows(True, self.metrics_text(None))}
        assert rows["nvml: utilisation gauge"].status == FAIL
        assert rows["nvml: utilisation gauge"].value.startswith("absent")

    def test_metrics_of_a_model_left_on_the_cpu(self) -> None:
        text = self.metrics_text(0.5).replace("minerd_model_on_accelerator 1.0", "minerd_model_on_accelerator 0.0")
        assert judge.metrics_rows(True, text)[0].status == FAIL

    def test_kernel(self) -> None:
        got = {"attention_ops": ["flash"], "attention_events": ["aten::_scaled_dot_product_flash_attention"],
               "forced_error": None, "logits_dtype": "bfloat16"}
        assert [r.status for r in judge.kernel_rows(True, "small", got)] == [PASS, PASS]
        math = {**got, "attention_ops": ["math"], "logits_dtype": "float32"}
        assert [r.status for r in judge.kernel_rows(True, "small", math)] == [FAIL, FAIL]
        forced = {**got, "forced_error": "No available kernel. Aborting execution."}
        assert judge.kernel_rows(True, "small", forced)[0].status == FAIL
        no_profiler = {**got, "attention_ops": [], "attention_events": [], "profiler_error": "CUPTI_ERROR"}
        assert judge.kernel_rows(True, "small", no_profiler)[0].status == PASS  # the forced run proved it

    @pytest.mark.parametrize(("minerd_tps", "mfu", "model", "statuses"), [
        (90_000.0, 0.41, "40.96", [PASS, PASS]),
        (70_000.0, 0.31, "40.96", [FAIL, PASS]),  # under 0.8 of the bare loop's 100,000
        (90_000.0, None, "40.96", [PASS, FAIL]),  # a GPU MFU cannot be had for
        (90_000.0, 0.41, "1235.81", [FAIL, PASS]),  # not the model the bare loop built
    ])
    def test_throughput(self, minerd_tps: float, mfu: float | None, model: str, statuses: list[Status]) -> None:
        line: dict[str, Any] = {"global_step": 1, "tokens_per_s": minerd_tps}
        if mfu is not None:
            line["mfu"] = mfu
        minerd = {"lines": [{"global_step": 0, "tokens_per_s": 1.0}, line], "skip": 1, "model": model}
        bare = {"tokens_per_s": 100_000.0, "mfu": 0.45, "parameters": 40_960_000}
        assert [r.status for r in judge.throughput_rows(True, "small", minerd, bare)] == statuses

    @pytest.mark.parametrize(("peak", "status"), [(25e9, PASS), (30e9, PASS), (35e9, FAIL), (14e9, FAIL),
                                                  (None, FAIL)])
    def test_peak_against_the_plan(self, peak: float | None, status: Status) -> None:
        report = {"cuda_available": True, "memory_plan": {"device_total": 30_000_000_000, "fits": True}}
        rows = judge.memory_rows(True, "llama-1b", report, None, int(peak) if peak else None, 24.1)
        assert [r.status for r in rows] == [PASS, status]

    def test_no_plan(self) -> None:
        rows = judge.memory_rows(True, "llama-1b", {"cuda_available": True}, None, 25_000_000_000, 24.1)
        assert [r.status for r in rows] == [FAIL, FAIL]
        assert "no memory_plan" in rows[0].value
        failed_run = judge.memory_rows(False, "tiny", None, "exit 2: No such option: --world-size", None, 0.0)
        assert [r.status for r in failed_run] == [FAIL, SKIP]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
class TestCpuRehearsal:
    """`--cpu-rehearsal` runs every check on the CPU (tiny preset, gloo): each one that applies
    there passes, the CUDA-only facts skip for want of CUDA, and nothing it started outlives it."""

    def test_rehearsal(self, tmp_path: Path) -> None:
        out_dir = tmp_path / "gpu-check"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        # 1. The whole check, as `make gpu-check GPU_CHECK_ARGS=--cpu-rehearsal` runs it.
        out = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--cpu-rehearsal", "--out", str(out_dir),
                              "--budget", "700"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=850)
        # 2. One table on stdout; results.json holds the same rows whole.
        assert out.stdout.count("| check ") == 1, out.stdout
        results = json.loads((out_dir / "results.json").read_text())
        rows = {r["check"]: r for r in results["rows"]}
        failures = [r for r in rows.values() if r["status"] == FAIL]
        assert not failures, f"{failures}\n{out.stdout}\n{out.stderr[-3000:]}"
        assert out.returncode == 0 == results["exit_code"]
        # 3. The plumbing ran: processes trained and stopped, /metrics read, the FSDP run under torchrun.
        for name in ("data: prepared dataset", "run tiny: trains, SIGTERM exits 0", "/metrics: served while training",
                     "tokens/s tiny: minerd / bare", "fsdp: torchrun, 1 rank (gloo)",
                     "compile: tokens/s compiled / eager (tiny)", "memory: plan (diagnose --world-size 1 --json)"):
            assert rows[name]["status"] == PASS, rows.get(name)
        # 4. Every skip says why: no CUDA here, or no Prometheus installed.
        for row in rows.values():
            if row["status"] == SKIP:
                assert row["value"].startswith(judge.NO_CUDA) or "prometheus not found" in row["value"], row
        if prom.binary() is not None:
            assert rows["grafana: Model on accelerator"]["status"] == PASS
        # 5. Every process it started is gone: none still names the check's folder.
        still = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(out_dir) in cmdline:
                still.append(f"{proc.name}: {cmdline[:200]}")
        assert not still
