"""The monitoring service, served by the real ApiServer on a free port and read with httpx.

The state is mutated the way the training loop does it (``first_step_done``,
``phase``, ``beat()``, progress fields, core metrics), so each route is checked
before the first step, during training and during shutdown.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import structlog
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from api.app import create_app
from api.server import ApiServer, ApiStartError
from daemon.config import ApiConfig, Config, WatchdogConfig
from daemon.diagnostics import collect
from daemon.gpu import GpuProbe
from daemon.logsetup import reset_logging
from daemon.metrics import CoreMetrics, EvalCollector, build_core_metrics
from daemon.state import MinerState
from daemon.tasks.twotower.task import EVAL_GAUGES

TOKEN = "s3cret-token-for-tests"

# docs/METRICS.md names this stage fills, as the parser reports them (counters
# lose their _total suffix in the family name).
CORE_FAMILIES = {
    "minerd_info": "gauge",
    "minerd_outer_step": "gauge",
    "minerd_inner_step": "gauge",
    "minerd_epoch": "gauge",
    "minerd_inner_steps": "counter",
    "minerd_samples": "counter",
    "minerd_step_duration_seconds": "histogram",
    "minerd_data_wait_seconds": "counter",
    "minerd_loss": "gauge",
    "minerd_learning_rate": "gauge",
    "minerd_separation_margin": "gauge",
    "minerd_nonfinite_steps": "counter",
    "minerd_slow_steps": "counter",
    "minerd_last_step_timestamp_seconds": "gauge",
    "minerd_model_on_accelerator": "gauge",
    "minerd_checkpoints": "counter",
    "minerd_last_checkpoint_timestamp_seconds": "gauge",
}


# Every test here drives a real HTTP server on a free port.
pytestmark = [pytest.mark.integration]

class Miner:
    """A state, a registry with the core metrics, and a live server on a free port."""

    def __init__(self, api_cfg: ApiConfig, wd_cfg: WatchdogConfig) -> None:
        self.state = MinerState(task="twotower", device="cpu")
        self.registry = CollectorRegistry()
        self.metrics: CoreMetrics = build_core_metrics(self.registry, self.state, GpuProbe())
        # The two-tower task's evaluation gauges, as build_run registers them for that task.
        self.registry.register(EvalCollector(self.state, EVAL_GAUGES))
        self.server = ApiServer(create_app(self.state, self.registry, api_cfg, wd_cfg), api_cfg)
        self.client: httpx.Client

    def step(self, n: int = 1) -> None:
        """What the training loop does after each inner step."""
        s = self.state
        for _ in range(n):
            s.inner_step += 1
            s.global_step += 1
            s.loss = 0.5
            s.learning_rate = 1e-3
            s.last_step_seconds = 0.02
            s.last_step_time = time.time()
            s.samples_per_second = 12800.0
            self.metrics.inner_steps.inc()
            self.metrics.samples.inc(256)
            self.metrics.step_duration.observe(0.02)
            s.first_step_done = True
            if s.phase == "starting":
                s.phase = "training"
            s.beat()


@contextmanager
def running(token: str | None = TOKEN, stall_seconds: float = 600, host: str = "127.0.0.1") -> Iterator[Miner]:
    api_cfg = ApiConfig(host=host, port=0, token=SecretStr(token) if token is not None else None)
    miner = Miner(api_cfg, WatchdogConfig(stall_seconds=stall_seconds, exit_on_stall=False))
    miner.server.start()
    try:
        with httpx.Client(base_url=miner.server.url, timeout=5) as client:
            miner.client = client
            yield miner
    finally:
        miner.server.stop(2)


@pytest.fixture
def miner() -> Iterator[Miner]:
    with running() as m:
        yield m


@pytest.fixture(autouse=True)
def _plain_structlog() -> Iterator[None]:
    """capture_logs needs structlog's defaults, whatever another test configured."""
    reset_logging()
    yield
    reset_logging()


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


class TestBeforeFirstStep:
    """During start-up the API answers, but the miner is not ready."""

    def test_livez_is_200_with_a_fresh_heartbeat(self, miner: Miner) -> None:
        r = miner.client.get("/livez")
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "ok"
        assert body["phase"] == "starting"
        assert 0 <= body["progress_age_seconds"] < 600

    def test_readyz_is_503(self, miner: Miner) -> None:
        r = miner.client.get("/readyz")
        assert r.status_code == 503
        assert r.json() == {"ready": False, "phase": "starting", "first_step_done": False, "reason": None}

    def test_status_has_nulls_for_unknown_values(self, miner: Miner) -> None:
        r = miner.client.get("/status")
        assert r.status_code == 200
        s = r.json()
        assert s["phase"] == "starting"
        assert s["ready"] is False
        assert s["inner_step"] == 0
        for key in ("loss", "learning_rate", "last_step_time", "samples_per_second", "separation_margin"):
            assert s[key] is None, key
        # No part has a section yet: upload's key is null, the others are not there at all.
        assert s["upload"] is None and s["sections"] == [] and "mining" not in s and "embeddings" not in s
        assert s["uptime_seconds"] >= 0
        assert s["version"] and s["task"] == "twotower" and s["device"] == "cpu"

    def test_diagnostics_is_503_until_the_runner_stores_them(self, miner: Miner) -> None:
        r = miner.client.get("/diagnostics")
        assert r.status_code == 503
        assert r.json() == {"detail": "diagnostics not collected yet"}

    def test_metrics_has_progress_gauges_but_no_made_up_loss(self, miner: Miner) -> None:
        r = miner.client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        fams = families(r.text)
        assert fams["minerd_inner_step"].samples[0].value == 0
        assert "minerd_loss" not in fams
        assert "minerd_last_step_timestamp_seconds" not in fams


class TestDuringTraining:
    """After the first inner step every route reports live progress."""

    def test_readyz_and_livez_are_200(self, miner: Miner) -> None:
        miner.step()
        assert miner.client.get("/readyz").status_code == 200
        assert miner.client.get("/readyz").json()["ready"] is True
        assert miner.client.get("/livez").status_code == 200

    def test_status_follows_the_state(self, miner: Miner) -> None:
        miner.step(3)
        miner.state.outer_step = 2
        miner.state.epoch = 1
        miner.state.eval = {"separation_margin": 0.052}
        s = miner.client.get("/status").json()
        assert (s["outer_step"], s["inner_step"], s["global_step"], s["epoch"]) == (2, 3, 3, 1)
        assert s["loss"] == 0.5 and s["learning_rate"] == 1e-3
        assert s["samples_per_second"] == 12800.0
        assert s["separation_margin"] == 0.052
        assert s["phase"] == "training" and s["ready"] is True and s["stalled"] is False
        assert abs(s["last_step_time"] - time.time()) < 60

    def test_status_sections_come_from_the_components(self, miner: Miner) -> None:
        np = pytest.importorskip("numpy")
        miner.state.sections["mining"] = lambda: {"in_q": 2, "out_q": 3, "fifo": np.int64(3)}

        def broken() -> dict[str, Any]:
            raise RuntimeError("uploader exploded")

        miner.state.sections["upload"] = broken
        r = miner.client.get("/status")
        assert r.status_code == 200
        s = r.json()
        assert s["mining"] == {"in_q": 2, "out_q": 3, "fifo": 3}
        assert s["upload"] == {"error": "RuntimeError: uploader exploded"}
        assert "embeddings" not in s and s["sections"] == ["upload", "mining"]

    def test_a_new_parts_section_needs_no_change_to_the_api(self, miner: Miner) -> None:
        """A section of a part the API model never heard of is served under its name, and in the
        OpenAPI schema's additional properties."""
        miner.state.sections["exchange"] = lambda: {"round": 12}
        s = miner.client.get("/status").json()
        assert s["exchange"] == {"round": 12} and "exchange" in s["sections"]
        schema = miner.client.get("/openapi.json").json()["components"]["schemas"]["Status"]
        assert schema["additionalProperties"] is not False

    def test_a_nonfinite_loss_is_null_not_a_500(self, miner: Miner) -> None:
        miner.step()
        miner.state.loss = float("nan")
        miner.state.sections["embeddings"] = lambda: {"hit_rate": float("inf")}
        r = miner.client.get("/status")
        assert r.status_code == 200
        assert r.json()["loss"] is None
        assert r.json()["embeddings"] == {"hit_rate": None}

    def test_diagnostics_serves_the_stored_block(self, miner: Miner) -> None:
        diag = collect(Config(), torch.device("cpu"), 1)
        miner.state.diagnostics = diag.model_dump()
        r = miner.client.get("/diagnostics")
        assert r.status_code == 200
        assert r.json() == diag.model_dump()

    def test_metrics_names_and_types_match_the_contract(self, miner: Miner) -> None:
        miner.step(2)
        miner.state.eval = {"separation_margin": 0.05}
        miner.state.last_checkpoint_time = time.time()
        miner.metrics.checkpoints.inc()
        r = miner.client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        fams = families(r.text)
        for name, kind in CORE_FAMILIES.items():
            assert name in fams, name
            assert fams[name].type == kind, name
        assert all(name.startswith("minerd_") for name in fams)
        info = fams["minerd_info"].samples[0]
        assert info.value == 1 and info.labels["task"] == "twotower" and info.labels["device"] == "cpu"
        totals = {s.name: s.value for s in fams["minerd_inner_steps"].samples}
        assert totals["minerd_inner_steps_total"] == 2
        buckets = [s for s in fams["minerd_step_duration_seconds"].samples if s.name.endswith("_bucket")]
        assert float(buckets[0].labels["le"]) == 0.01
        assert "minerd_gpu_memory_allocated_bytes" not in fams  # no GPU here: absent, not zero
        assert fams["minerd_model_on_accelerator"].samples[0].value == 0

    def test_metrics_is_a_plain_route_without_redirect(self, miner: Miner) -> None:
        r = miner.client.get("/metrics", follow_redirects=False)
        assert r.status_code == 200


class TestDuringShutdown:
    """Once shutdown begins the miner leaves the pool but is still alive."""

    def test_readyz_503_livez_200(self, miner: Miner) -> None:
        miner.step()
        miner.state.phase = "stopping"
        miner.state.beat()  # the final checkpoint is progress too
        r = miner.client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["phase"] == "stopping"
        assert miner.client.get("/livez").status_code == 200
        assert miner.client.get("/status").json()["phase"] == "stopping"
        assert miner.client.get("/metrics").status_code == 200


class TestStall:
    """An old heartbeat turns /livez into 503 with the age; progress brings it back."""

    def test_livez_503_with_the_age_after_a_stall(self) -> None:
        with running(stall_seconds=0.3) as miner:
            miner.step()
            assert miner.client.get("/livez").status_code == 200
            time.sleep(0.5)
            r = miner.client.get("/livez")
            assert r.status_code == 503
            body = r.json()
            assert body["status"] == "stalled"
            assert body["progress_age_seconds"] > 0.3
            assert body["stall_seconds"] == 0.3
            assert miner.client.get("/status").json()["stalled"] is True
            miner.step()
            assert miner.client.get("/livez").status_code == 200

    def test_livez_503_while_training_fails(self, miner: Miner) -> None:
        """A loop restoring after non-finite steps beats on, and is not alive all the same."""
        miner.step()
        miner.state.live_problem = "2 non-finite inner steps in a row; restored, and no finite step since"
        r = miner.client.get("/livez")
        assert r.status_code == 503 and r.json()["status"] == "failing"
        assert r.json()["reason"].startswith("2 non-finite inner steps")
        miner.state.live_problem = None
        assert miner.client.get("/livez").status_code == 200


def control(client: httpx.Client, action: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return client.post(f"/control/{action}", headers=headers)


class TestControlAuth:
    """Control routes need the configured bearer token, compared in constant time."""

    @pytest.mark.parametrize("action", ["checkpoint", "upload", "pause", "resume"])
    def test_403_while_no_token_is_configured(self, action: str) -> None:
        with running(token=None) as miner:
            assert control(miner.client, action, None).status_code == 403
            assert control(miner.client, action, "anything").status_code == 403
            assert not miner.state.controls.paused.is_set()

    def test_an_empty_configured_token_counts_as_none(self) -> None:
        with running(token="") as miner:
            assert control(miner.client, "checkpoint", None).status_code == 403
            assert control(miner.client, "checkpoint", "x").status_code == 403

    @pytest.mark.parametrize("action", ["checkpoint", "upload", "pause", "resume"])
    def test_401_for_missing_or_wrong_token(self, miner: Miner, action: str) -> None:
        for token in (None, "wrong", TOKEN + "x", TOKEN[:-1]):
            r = control(miner.client, action, token)
            assert r.status_code == 401, token
            assert r.headers["www-authenticate"] == "Bearer"
        for header in (f"Basic {TOKEN}", "Bearer", TOKEN, f"Bearer  {TOKEN} extra"):
            r = miner.client.post(f"/control/{action}", headers={"Authorization": header})
            assert r.status_code == 401, header
        c = miner.state.controls
        assert not (c.checkpoint.is_set() or c.upload.is_set() or c.paused.is_set())

    def test_non_ascii_token_is_401_not_500(self, miner: Miner) -> None:
        r = miner.client.post("/control/pause", headers={"Authorization": "Bearer caf\xe9".encode("latin-1")})
        assert r.status_code == 401

    def test_right_token_sets_and_clears_the_control_events(self, miner: Miner) -> None:
        c = miner.state.controls
        r = control(miner.client, "checkpoint", TOKEN)
        assert r.status_code == 200
        assert r.json()["checkpoint_requested"] is True and c.checkpoint.is_set()
        assert control(miner.client, "upload", TOKEN).status_code == 200 and c.upload.is_set()
        r = control(miner.client, "pause", TOKEN)
        assert r.status_code == 200 and r.json()["paused"] is True and c.paused.is_set()
        assert miner.client.get("/status").json()["paused"] is True
        r = control(miner.client, "resume", TOKEN)
        assert r.status_code == 200 and r.json()["paused"] is False and not c.paused.is_set()

    def test_hmac_compare_digest_is_what_compares(self, miner: Miner, monkeypatch: pytest.MonkeyPatch) -> None:
        calls: list[tuple[bytes, bytes]] = []
        real: Callable[[bytes, bytes], bool] = hmac.compare_digest

        def spy(a: bytes, b: bytes) -> bool:
            calls.append((a, b))
            return real(a, b)

        monkeypatch.setattr(hmac, "compare_digest", spy)
        assert control(miner.client, "checkpoint", "wrong").status_code == 401
        assert control(miner.client, "checkpoint", TOKEN).status_code == 200
        assert calls == [(b"wrong", TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]

    def test_only_post_is_allowed(self, miner: Miner) -> None:
        assert miner.client.get("/control/pause").status_code == 405

    def test_the_token_never_leaks(self, miner: Miner) -> None:
        with structlog.testing.capture_logs() as logs:
            control(miner.client, "checkpoint", TOKEN)
            control(miner.client, "checkpoint", "wrong")
            texts = [miner.client.get(p).text for p in ("/status", "/metrics", "/livez", "/readyz", "/openapi.json")]
        assert any(e["event"] == "control request accepted" for e in logs)
        assert any(e.get("reason") == "wrong bearer token" for e in logs)
        assert TOKEN not in repr(logs)
        for text in texts:
            assert TOKEN not in text


class TestMalformedRequests:
    """Bad requests get 4xx, never 5xx."""

    def test_unknown_routes_methods_and_bodies(self, miner: Miner) -> None:
        assert miner.client.get("/nope").status_code == 404
        assert miner.client.delete("/status").status_code == 405
        assert miner.client.post("/livez").status_code == 405
        r = miner.client.post(
            "/control/pause",
            content=b"\xff\x00not json",
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        assert r.status_code == 200
        assert miner.client.get("/status?x=%ff&y").status_code == 200
        r = miner.client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=9"})
        assert r.status_code == 200


class TestServerLifecycle:
    """ApiServer binds before start() returns, reports its port, and warns on an open bind."""

    def test_port_zero_picks_a_free_port_and_stop_ends_the_thread(self) -> None:
        with running() as miner:
            assert miner.server.port and miner.server.port > 0
            assert miner.server.running
            assert miner.client.get("/livez").status_code == 200
        assert not miner.server.running

    def test_a_port_in_use_is_a_clear_error(self, miner: Miner) -> None:
        cfg = ApiConfig(port=miner.server.port)
        other = ApiServer(create_app(miner.state, miner.registry, cfg, WatchdogConfig()), cfg)
        with pytest.raises(ApiStartError, match="could not listen"):
            other.start()

    def test_non_loopback_bind_without_token_warns(self) -> None:
        with structlog.testing.capture_logs() as logs, running(token=None, host="0.0.0.0") as miner:
            assert miner.client.get("/livez").status_code == 200
        warnings = [e for e in logs if e["log_level"] == "warning" and "non-loopback" in e["event"]]
        assert len(warnings) == 1 and warnings[0]["host"] == "0.0.0.0"

    def test_loopback_bind_or_a_token_does_not_warn(self) -> None:
        with structlog.testing.capture_logs() as logs:
            with running(token=None):
                pass
            with running(token=TOKEN, host="0.0.0.0"):
                pass
        assert not [e for e in logs if "non-loopback" in e["event"]]
