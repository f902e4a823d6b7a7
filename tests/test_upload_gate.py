"""The upload gate, its log lines, the repo age, and the metric names."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from daemon.config import UploadConfig
from daemon.upload import GateState, Uploader, decide

SEED_LINE = (
    "UPLOAD BLOCKED: inner_step (15) < minimum (50). Validators will reject this! Waiting for more training steps..."
)
CFG = UploadConfig(min_inner_step=50, every_inner_steps=3)


class TestGateTable:
    """Each row is one miner state and the decision and reason the gate must give."""

    @pytest.mark.parametrize(
        ("state", "allowed", "reason"),
        [
            (GateState(0, 15, 1.0), False, "min_inner_step"),
            (GateState(0, 48, 1.0), False, "min_inner_step"),
            (GateState(0, 50, 1.0), False, "not_on_schedule"),
            (GateState(0, 51, 1.0), True, "ok"),
            (GateState(0, 54, 1.0), True, "ok"),
            (GateState(0, 57, float("nan")), False, "nonfinite"),
            (GateState(0, 57, float("inf")), False, "nonfinite"),
            (GateState(0, 57, 1.0, params_finite=False), False, "nonfinite"),
            (GateState(0, 57, 1.0, in_progress=True), False, "in_progress"),
            (GateState(0, 54, 1.0, last_published=(0, 57)), False, "not_newer"),
            (GateState(0, 57, 1.0, last_published=(0, 57)), False, "not_newer"),
            (GateState(1, 51, 1.0, last_published=(0, 99)), True, "ok"),
            (GateState(0, 52, 1.0, forced=True), True, "ok"),
            (GateState(0, 16, 1.0, forced=True), False, "min_inner_step"),
        ],
    )
    def test_row(self, state: GateState, allowed: bool, reason: str) -> None:
        d = decide(CFG, state)
        assert (d.allowed, d.reason) == (allowed, reason)

    def test_seed_schedule(self) -> None:
        """With 50 and 3 the first uploads are at 51, 54, 57."""
        allowed = [s for s in range(1, 60) if decide(CFG, GateState(0, s, 1.0)).allowed]
        assert allowed == [51, 54, 57]

    def test_seed_line_exact(self) -> None:
        assert decide(CFG, GateState(0, 15, 1.0)).message == SEED_LINE

    def test_disabled(self) -> None:
        assert decide(UploadConfig(enabled=False), GateState(0, 51, 1.0)).reason == "disabled"

    def test_time_floor_under_the_schedule(self) -> None:
        """A scheduled step sooner than upload.min_interval_seconds after the last upload waits,
        quietly (not an attempt); a forced upload does not wait."""
        cfg = UploadConfig(min_inner_step=0, every_inner_steps=3, min_interval_seconds=30)
        soon = decide(cfg, GateState(0, 9, 1.0, last_published=(0, 6), seconds_since_last=12.0))
        assert (soon.allowed, soon.reason, soon.quiet) == (False, "min_interval", True)
        assert "12s since the last upload" in soon.message
        assert decide(cfg, GateState(0, 9, 1.0, last_published=(0, 6), seconds_since_last=31.0)).allowed
        assert decide(cfg, GateState(0, 9, 1.0, last_published=(0, 6), seconds_since_last=1.0, forced=True)).allowed
        assert decide(cfg, GateState(0, 9, 1.0)).allowed  # nothing published yet


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    return m, opt


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _uploader(tmp_path: Path, registry: CollectorRegistry, clock: _Clock, **cfg: object) -> Uploader:
    fields: dict[str, object] = {"min_inner_step": 50, "every_inner_steps": 3, "max_age_seconds": 1800}
    c = UploadConfig.model_validate(fields | cfg)
    return Uploader.from_config(c, tmp_path, registry, config_hash="t", clock=clock)


class TestBlockedLogging:
    """Blocked attempts log one line per reason change and count every block."""

    def test_once_per_reason(self, tmp_path: Path) -> None:
        reg, clock = CollectorRegistry(), _Clock()
        up = _uploader(tmp_path, reg, clock)
        m, opt = _model()
        with capture_logs() as logs:
            for step in range(1, 50):
                assert not up.on_inner_step(0, step, 1.0, m, opt).allowed
        blocked = [e for e in logs if e["event"].startswith("UPLOAD BLOCKED")]
        assert [e["event"] for e in blocked] == [
            "UPLOAD BLOCKED: inner_step (3) < minimum (50). Validators will reject this! "
            "Waiting for more training steps..."
        ]
        assert blocked[0]["log_level"] == "warning"
        # 3, 6, ..., 48 are attempts; the steps in between are only "not on schedule".
        assert reg.get_sample_value("minerd_upload_blocked_total", {"reason": "min_inner_step"}) == 16
        assert reg.get_sample_value("minerd_upload_blocked_total", {"reason": "not_on_schedule"}) == 33
        assert reg.get_sample_value("minerd_upload_attempts_total", {"result": "blocked"}) == 16
        assert up.status()["blocked_reason"] == "min_inner_step"

    def test_reason_change_logs_again(self, tmp_path: Path) -> None:
        reg, clock = CollectorRegistry(), _Clock()
        up = _uploader(tmp_path, reg, clock, min_inner_step=0)
        m, opt = _model()
        with capture_logs() as logs:
            up.on_inner_step(0, 3, math.nan, m, opt)
            up.on_inner_step(0, 6, math.nan, m, opt)
            with torch.no_grad():
                m.weight[0, 0] = math.inf
            up.on_inner_step(0, 9, 1.0, m, opt)
        lines = [e["event"] for e in logs if e["event"].startswith("UPLOAD BLOCKED")]
        assert len(lines) == 1 and "loss (nan)" in lines[0]
        assert reg.get_sample_value("minerd_upload_blocked_total", {"reason": "nonfinite"}) == 3

    def test_forced_request_is_one_shot(self, tmp_path: Path) -> None:
        reg, clock = CollectorRegistry(), _Clock()
        up = _uploader(tmp_path, reg, clock)
        m, opt = _model()
        up.request_upload()
        assert up.status()["upload_requested"]
        # 52 is off schedule; the request lets it through the rest of the gate.
        assert up.on_inner_step(0, 52, 1.0, m, opt).allowed
        assert not up.status()["upload_requested"]
        assert up.on_inner_step(0, 53, 1.0, m, opt).reason == "not_on_schedule"
        # Not started, so the snapshot handed over is still "in progress".
        assert up.status()["in_progress"]
        assert up.on_inner_step(0, 54, 1.0, m, opt).reason == "in_progress"


class TestRepoAge:
    """Age is total seconds between Unix times; stale after max_age_seconds."""

    def test_stale_after_days_not_seconds_of_a_day(self, tmp_path: Path) -> None:
        reg, clock = CollectorRegistry(), _Clock()
        up = _uploader(tmp_path, reg, clock, min_inner_step=0)
        m, opt = _model()
        up.start()
        try:
            assert up.on_inner_step(0, 3, 1.0, m, opt).allowed
            assert up.wait_idle(30)
            assert reg.get_sample_value("minerd_upload_stale") == 0
            # One day and 60 s later: timedelta.seconds would say 60 s.
            clock.now += 86_400 + 60
            with capture_logs() as logs:
                up.on_inner_step(0, 4, 1.0, m, opt)
                up.on_inner_step(0, 5, 1.0, m, opt)
            stale = [e for e in logs if e["event"].startswith("UPLOAD STALE")]
            assert len(stale) == 1
            assert reg.get_sample_value("minerd_upload_age_seconds") == pytest.approx(86_460)
            assert reg.get_sample_value("minerd_upload_stale") == 1
            assert up.status()["age_seconds"] == pytest.approx(86_460)
        finally:
            assert up.stop(10)

    def test_never_uploaded_goes_stale_from_start(self, tmp_path: Path) -> None:
        reg, clock = CollectorRegistry(), _Clock()
        up = _uploader(tmp_path, reg, clock)
        assert reg.get_sample_value("minerd_upload_age_seconds") is None
        assert reg.get_sample_value("minerd_upload_stale") == 0
        clock.now += 1801
        assert reg.get_sample_value("minerd_upload_stale") == 1
        assert up.status()["stale"] is True


class TestMetricNames:
    """A fresh registry carries the docs/METRICS.md names and labels from the start."""

    def test_names_and_labels(self, tmp_path: Path) -> None:
        reg = CollectorRegistry()
        _uploader(tmp_path, reg, _Clock())
        for result in ("ok", "blocked", "failed"):
            assert reg.get_sample_value("minerd_upload_attempts_total", {"result": result}) == 0
        for reason in ("min_inner_step", "not_on_schedule", "nonfinite", "in_progress", "not_newer"):
            assert reg.get_sample_value("minerd_upload_blocked_total", {"reason": reason}) == 0
        assert reg.get_sample_value("minerd_last_upload_timestamp_seconds") == 0
        assert reg.get_sample_value("minerd_upload_duration_seconds_count") == 0
        assert reg.get_sample_value("minerd_upload_duration_seconds_bucket", {"le": "600.0"}) == 0
        assert reg.get_sample_value("minerd_upload_bytes_total") == 0
        assert reg.get_sample_value("minerd_upload_in_progress") == 0


class TestDisabled:
    """A disabled uploader says so once, touches nothing and never goes stale."""

    def test_disabled_is_quiet(self, tmp_path: Path) -> None:
        reg, clock = CollectorRegistry(), _Clock()
        up = _uploader(tmp_path, reg, clock, enabled=False)
        m, opt = _model()
        with capture_logs() as logs:
            up.start()
            for step in range(49, 60):
                assert up.on_inner_step(0, step, 1.0, m, opt).reason == "disabled"
            clock.now += 10_000
        assert [e["event"] for e in logs] == ["UPLOAD DISABLED: upload.enabled is false; nothing will be published."]
        assert reg.get_sample_value("minerd_upload_blocked_total", {"reason": "disabled"}) == 11
        assert reg.get_sample_value("minerd_upload_attempts_total", {"result": "blocked"}) == 0
        assert up.status()["blocked_reason"] == "disabled" and up.status()["stale"] is False
        assert not (tmp_path / "uploads").exists()
        assert up.stop(1)
