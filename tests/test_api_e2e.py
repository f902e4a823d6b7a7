"""The monitoring service of a real `minerd run` subprocess: before the first step, during training,
during shutdown, and when training stalls."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.data.generated.corpus import corpus_path
from daemon.run.catalog import CATALOG, load_config
from tests.conftest import ROOT, small_sets

pytestmark = [pytest.mark.integration]
METRICS_DOC = ROOT / "docs" / "METRICS.md"
TYPES = {"gauge": "gauge", "counter": "counter", "histogram": "histogram"}


def contract_types() -> dict[str, str]:
    """Metric name -> type from the tables of docs/METRICS.md (the first type for `a / b / c` rows)."""
    out: dict[str, str] = {}
    for raw in METRICS_DOC.read_text().splitlines():
        # label alternatives inside backticks use "|": not a cell border
        line = re.sub(r"`[^`]*`", lambda mt: mt.group(0).replace("|", "/"), raw)
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or "minerd_" not in cells[0]:
            continue
        names = re.findall(r"`(minerd_[a-z_]+)", cells[0])
        types = [t.strip() for t in cells[1].split("/")]
        for i, name in enumerate(names):
            t = types[i] if len(types) == len(names) else types[0]
            out[name] = TYPES.get(t.split()[0], t)
    return out


class TestLifecycleRoutes:
    """Every route answers as the contract (README, docs/OPERATIONS.md) says, while training and while stopping."""

    def test_training_and_shutdown(self, tmp_path: Path, miner_factory) -> None:
        state = tmp_path / "s"
        m = miner_factory(state, small_sets(state, "api.port=0", "api.token=sekret", "twotower.hidden_dim=1536",
                                            "upload.enabled=true", "upload.min_inner_step=2"))
        url = m.api_url()
        c = httpx.Client(base_url=url, timeout=5)
        m.wait_for("Outer Step:")
        end = time.monotonic() + 30
        while c.get("/readyz").status_code != 200 and time.monotonic() < end:
            time.sleep(0.05)
        assert c.get("/readyz").status_code == 200
        assert c.get("/livez").status_code == 200
        st = c.get("/status").json()
        assert st["phase"] == "training" and st["task"] == "twotower" and st["device"] == "cpu"
        assert st["rank"] == 0 and st["world_size"] == 1 and st["global_step"] >= 1
        assert st["upload"] is not None and "sekret" not in json.dumps(st)
        diag = c.get("/diagnostics").json()
        assert diag["model_device"] == "cpu" and diag["gradient_accumulation_steps"] == 2
        # control routes: 401 without or with a wrong token, 200 with the right one
        assert c.post("/control/checkpoint").status_code == 401
        assert c.post("/control/checkpoint", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = c.post("/control/checkpoint", headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        m.wait_for('"reason": "requested"')
        # metrics: names and types as the contract says
        text = c.get("/metrics").text
        assert "sekret" not in text
        want = contract_types()
        seen = {f.name: f.type for f in text_string_to_metric_families(text)}
        for name in ("minerd_info", "minerd_outer_step", "minerd_inner_step", "minerd_epoch", "minerd_loss",
                     "minerd_learning_rate", "minerd_step_duration_seconds", "minerd_last_step_timestamp_seconds",
                     "minerd_model_on_accelerator", "minerd_checkpoints", "minerd_inner_steps", "minerd_samples",
                     "minerd_upload_attempts", "minerd_upload_blocked"):
            assert name in seen, name
        for name, mtype in seen.items():
            key = name if name in want else f"{name}_total"
            if key in want:
                assert want[key] == mtype, (name, mtype, want[key])
        # shutdown: readiness goes 503 while liveness stays 200
        m.signal(signal.SIGINT)
        codes = []
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                codes.append((c.get("/readyz").status_code, c.get("/livez").status_code))
            except httpx.TransportError:
                break
        assert (503, 200) in codes, codes
        assert m.wait(60) == 0


def stalled_miner(tmp_path: Path, miner_factory, *extra: str):
    state = tmp_path / "s"
    sets = small_sets(state, "api.port=0", "watchdog.stall_seconds=3", *extra)
    cfg = load_config(sets=sets, environ={})
    request = CATALOG.task_for(cfg).data(cfg)  # the generated corpus the two-tower job reads first
    fifo = corpus_path(request.spec, state / "data")
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)  # opening it for reading blocks until a writer comes: none will
    return miner_factory(state, sets)


class TestStall:
    """A stalled start-up (a storage read that never returns) drives /livez to 503 and the process to exit 3."""

    def test_livez_reports_the_stall(self, tmp_path: Path, miner_factory) -> None:
        m = stalled_miner(tmp_path, miner_factory, "watchdog.exit_on_stall=false")
        c = httpx.Client(base_url=m.api_url(), timeout=5)
        assert c.get("/readyz").status_code == 503
        assert c.get("/diagnostics").status_code == 503
        assert c.get("/status").json()["phase"] == "starting"
        end = time.monotonic() + 20
        while c.get("/livez").status_code == 200 and time.monotonic() < end:
            time.sleep(0.1)
        r = c.get("/livez")
        assert r.status_code == 503 and r.json()["progress_age_seconds"] > 3

    def test_stall_exits_3_with_stacks(self, tmp_path: Path, miner_factory) -> None:
        m = stalled_miner(tmp_path, miner_factory)
        assert m.wait(30) == 3
        text = m.text()
        assert "stack of thread MainThread" in text and "load_or_generate" in text
