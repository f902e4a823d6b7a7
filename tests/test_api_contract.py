"""The published contract: /openapi.json fuzzed by schemathesis, and `minerd status` reading /status."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from api.app import create_app
from api.server import ApiServer
from daemon.config import ApiConfig, Config, WatchdogConfig
from daemon.diagnostics import collect
from daemon.gpu import GpuProbe
from daemon.metrics import EvalCollector, build_core_metrics
from daemon.state import MinerState
from daemon.status_cmd import render_summary, run_status, status_url
from daemon.tasks.twotower.task import EVAL_GAUGES

TOKEN = "contract-token"
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


class Served:
    def __init__(self) -> None:
        self.state = MinerState(task="twotower", device="cpu")
        self.registry = CollectorRegistry()
        self.metrics = build_core_metrics(self.registry, self.state, GpuProbe())
        self.registry.register(EvalCollector(self.state, EVAL_GAUGES))
        cfg = ApiConfig(port=0, token=SecretStr(TOKEN))
        self.server = ApiServer(create_app(self.state, self.registry, cfg, WatchdogConfig()), cfg)

    def train(self) -> None:
        s = self.state
        s.diagnostics = collect(Config(), torch.device("cpu"), 1).model_dump()
        s.outer_step, s.inner_step, s.global_step, s.epoch = 1, 7, 507, 2
        s.loss, s.learning_rate, s.last_step_seconds = 0.4123, 2.1e-5, 15.2
        s.last_step_time = time.time()
        s.samples_per_second = 1234.5
        s.eval = {"separation_margin": 0.052}
        s.sections["mining"] = lambda: {"in_q": 2, "out_q": 3, "fifo": 3}
        self.metrics.inner_steps.inc(7)
        s.first_step_done = True
        s.phase = "training"
        s.beat()


@pytest.fixture
def served() -> Iterator[Served]:
    srv = Served()
    srv.server.start()
    yield srv
    srv.server.stop(2)


def schemathesis(url: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        str(SCHEMATHESIS),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        "25",
        "--seed",
        "1",
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--no-color",
        "-H",
        f"Authorization: Bearer {TOKEN}",
        *extra,
    ]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.integration
class TestOpenApiContract:
    """Fuzzed requests get documented codes and bodies matching their schemas, and no 5xx."""

    def test_while_training_every_check_passes(self, served: Served, tmp_path: Path) -> None:
        served.train()
        proc = schemathesis(served.server.url, tmp_path)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert "Tested: 9" in proc.stdout

    def test_before_the_first_step_503s_are_documented(self, served: Served, tmp_path: Path) -> None:
        # /readyz and /diagnostics answer 503 by contract here; not_a_server_error
        # would flag them, and status_code_conformance still flags any other 5xx
        # (none is documented).
        proc = schemathesis(served.server.url, tmp_path, "--exclude-checks", "not_a_server_error")
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert "Tested: 9" in proc.stdout


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.integration
class TestStatusCommand:
    """`minerd status` prints a summary or the JSON, and one line with exit 1 when unreachable."""

    def test_summary_of_a_training_miner(self, served: Served) -> None:
        served.train()
        out, err = io.StringIO(), io.StringIO()
        assert run_status(served.server.url, out=out, err=err) == 0
        text = out.getvalue()
        assert err.getvalue() == ""
        assert "phase: training (ready)" in text
        assert "outer 1  inner 7  global 507  epoch 2" in text
        assert "loss 0.4123" in text and "lr 0.00002100" in text
        assert "mining: in_q=2 out_q=3 fifo=3" in text
        assert "upload: off" in text

    def test_json_is_the_status_object(self, served: Served) -> None:
        out = io.StringIO()
        assert run_status(served.server.url + "/status", as_json=True, out=out, err=io.StringIO()) == 0
        data = json.loads(out.getvalue())
        assert data["phase"] == "starting" and data["ready"] is False
        assert TOKEN not in out.getvalue()

    def test_unreachable_is_one_line_and_exit_1(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        url = f"http://127.0.0.1:{closed_port()}"
        assert run_status(url, out=out, err=err, timeout=2) == 1
        assert out.getvalue() == ""
        lines = err.getvalue().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith(f"minerd status: cannot reach {url}/status")

    def test_a_url_without_a_minerd_status_is_exit_1(self, served: Served) -> None:
        err = io.StringIO()
        assert run_status(served.server.url + "/metrics", out=io.StringIO(), err=err) == 1
        assert len(err.getvalue().splitlines()) == 1

    def test_url_forms(self) -> None:
        assert status_url("127.0.0.1:9108") == "http://127.0.0.1:9108/status"
        assert status_url("http://h:1/") == "http://h:1/status"
        assert status_url("http://h:1/status") == "http://h:1/status"

    def test_summary_tolerates_a_sparse_status(self) -> None:
        lines = render_summary({"phase": "starting"})
        assert lines[1].startswith("phase: starting (not ready)")
