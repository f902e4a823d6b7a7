"""Deployment files checked with the real tools: promtool, systemd-analyze, node; and the dashboard.

A missing tool skips these tests with the reason, except in CI (CI=true) where it fails them:
.ci/install-tools.sh installs every tool they use.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.config import Config, ShutdownConfig
from daemon.run.catalog import CATALOG
from tests.deploy_tools import (
    DASHBOARD,
    DEPLOY,
    METRIC_NAME,
    PROMETHEUS_DIR,
    ROOT,
    dashboard_targets,
    fill_dashboard_variables,
    load_ecosystem,
    need_tool,
)

# The metric names the miner serves: the contract's and minerd's own, as the repository documents them.
METRICS_DOC = ROOT / "docs" / "METRICS.md"
SHUTDOWN_DEADLINE_S = ShutdownConfig().deadline_seconds
UNIT = DEPLOY / "systemd" / "minerd.service"

REQUIRED_ALERTS = {
    "MinerdDown",
    "MinerdTrainingStalled",
    "MinerdSlowSteps",
    "MinerdModelNotOnAccelerator",
    "MinerdUploadsBlocked",
    "MinerdUploadsFailing",
    "MinerdUploadTooOld",
    "MinerdNonFiniteLoss",
    "MinerdMiningStarved",
    "MinerdEmbeddingCacheHitRateLow",
    "MinerdEvalLossRising",
}


def run(args: list[str], cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def contract_metric_names() -> set[str]:
    """Sample names allowed by the tables of docs/METRICS.md (histograms add _bucket/_sum/_count)."""
    text = METRICS_DOC.read_text()
    section = text.split("## Prometheus metrics", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        # cells are split on " | ": a label list like {queue="in"|"out"} holds a bare "|"
        cells = [c.strip() for c in re.split(r"\s\|\s", line.strip().strip("|"))]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        row_names = re.findall(r"`(minerd_[a-z0-9_]+)", cells[0])
        types = [t.strip() for t in cells[1].split("/")]
        if len(types) != len(row_names):
            types = [cells[1]] * len(row_names)
        for name, kind in zip(row_names, types, strict=True):
            names.add(name)
            if "histogram" in kind:
                names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
    assert len(names) > 30, f"could not parse the metric tables of {METRICS_DOC}"
    return names


def config_fields(section: str) -> set[str]:
    """Keys of one config section (empty for an unknown section)."""
    info = CATALOG.model.model_fields.get(section)
    model = info.annotation if info else None
    return set(getattr(model, "model_fields", {}))


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def load_dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def unit_settings(text: str) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), ...]}; keys may repeat (Environment=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def seconds(value: str) -> float:
    """systemd/pm2 time spans as used in our files: '45s', '15min', '600', '60s'."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|sec|m|min|h)?", value.strip())
    assert match, f"unexpected time span {value!r}"
    factor = {"ms": 0.001, None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[match.group(2)]
    return float(match.group(1)) * factor


# --- Prometheus ----------------------------------------------------------------------------------
class TestPrometheusConfig:
    """promtool accepts the scrape config, in its single-miner and its multi-GPU form."""

    @pytest.mark.integration
    def test_check_config_passes(self) -> None:
        promtool = need_tool("promtool")
        out = run([promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")])
        assert out.returncode == 0, out.stdout + out.stderr
        assert "SUCCESS" in out.stdout + out.stderr

    def test_scrapes_the_miner_port_every_15s_and_loads_the_alerts(self) -> None:
        cfg = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        assert cfg["global"]["scrape_interval"] == "15s"
        assert cfg["rule_files"] == ["alerts.yml"]
        targets = [t for job in cfg["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
        assert targets == ["127.0.0.1:9108"]

    @pytest.mark.integration
    def test_multi_gpu_block_is_a_valid_config_with_one_target_per_rank(self, tmp_path: Path) -> None:
        promtool = need_tool("promtool")
        text = (PROMETHEUS_DIR / "prometheus.yml").read_text()
        block = re.search(r"# BEGIN multi-gpu\n(.*?)\n\s*# END multi-gpu", text, re.S)
        assert block, "prometheus.yml lost its '# BEGIN multi-gpu' ... '# END multi-gpu' block"
        uncommented = "\n".join(re.sub(r"^(\s*)# ?", r"\1", line) for line in block.group(1).splitlines())
        cfg = yaml.safe_load(text)
        cfg["scrape_configs"] = yaml.safe_load(uncommented)
        ranks = {sc["labels"]["rank"]: sc["targets"] for job in cfg["scrape_configs"] for sc in job["static_configs"]}
        assert ranks == {str(r): [f"127.0.0.1:{9108 + r}"] for r in range(4)}
        shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp_path / "alerts.yml")
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        out = run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
        assert out.returncode == 0, out.stdout + out.stderr


class TestAlertRules:
    """The alert rules are valid, complete, documented, and their promtool unit tests pass."""

    @pytest.mark.integration
    def test_check_rules_passes(self) -> None:
        promtool = need_tool("promtool")
        out = run([promtool, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml")])
        assert out.returncode == 0, out.stdout + out.stderr

    @pytest.mark.integration
    def test_unit_tests_pass(self) -> None:
        promtool = need_tool("promtool")
        out = run([promtool, "test", "rules", str(PROMETHEUS_DIR / "alerts_test.yml")])
        assert out.returncode == 0, out.stdout + out.stderr
        assert "SUCCESS" in out.stdout + out.stderr

    def test_every_alert_is_exercised_firing_and_quiet(self) -> None:
        tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
        firing: set[str] = set()
        quiet: set[str] = set()
        for case in tests:
            for check in case["alert_rule_test"]:
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
        names = {rule["alert"] for rule in alert_rules()}
        assert names - firing == set(), "alerts without a firing case"
        assert names - quiet == set(), "alerts without a not-firing case"

    @pytest.mark.integration
    def test_unit_tests_fail_when_alerts_never_fire(self, tmp_path: Path) -> None:
        """Every alert's firing case depends on its rule: with all rules neutered, each one fails."""
        promtool = need_tool("promtool")
        doc = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
        for group in doc["groups"]:
            for rule in group["rules"]:
                rule["expr"] = "vector(1) == 0"
        (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc))
        shutil.copy(PROMETHEUS_DIR / "alerts_test.yml", tmp_path / "alerts_test.yml")
        out = run([promtool, "test", "rules", str(tmp_path / "alerts_test.yml")])
        assert out.returncode != 0
        failed = set(re.findall(r"alertname: (\w+),", out.stdout + out.stderr))
        assert failed == {rule["alert"] for rule in alert_rules()}

    def test_required_alerts_have_for_severity_and_advice(self) -> None:
        rules = alert_rules()
        assert {r["alert"] for r in rules} >= REQUIRED_ALERTS
        operations = (ROOT / "docs" / "OPERATIONS.md").read_text()
        anchors = {
            re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", operations, re.M)
        }
        for rule in rules:
            name = rule["alert"]
            assert "for" in rule, name
            assert rule["labels"]["severity"] in {"critical", "warning"}, name
            assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
            runbook = rule["annotations"]["runbook"]
            assert runbook.startswith("docs/OPERATIONS.md#"), name
            assert runbook.split("#", 1)[1] in anchors, f"{name}: no heading for {runbook}"

    def test_alerts_use_only_contract_metrics(self) -> None:
        allowed = contract_metric_names()
        used = {m for rule in alert_rules() for m in METRIC_NAME.findall(rule["expr"])}
        assert used - allowed == set()

    def test_thresholds_match_config_defaults(self) -> None:
        cfg = Config()
        exprs = {r["alert"]: r["expr"] for r in alert_rules()}
        assert f"> {int(cfg.watchdog.stall_seconds)}" in exprs["MinerdTrainingStalled"]
        assert f"> {int(cfg.upload.max_age_seconds)}" in exprs["MinerdUploadTooOld"]


# --- systemd -------------------------------------------------------------------------------------
def verify_root(tmp_path: Path, unit_text: str, name: str = "minerd.service") -> Path:
    """A root directory for `systemd-analyze verify --root`: the host's unit library (targets the
    unit refers to), our unit unchanged, and an executable stub at the unit's ExecStart path, which
    stands in for /opt/minerd/.venv/bin/minerd (verify refuses a unit whose binary is missing; the
    real binary exists only after an install). Nothing else is substituted."""
    root = tmp_path / "root"
    library = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir())
    shutil.copytree(library, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / f"etc/systemd/system/{name}").write_text(unit_text)
    exec_start = dict(unit_settings(unit_text)["Service"])["ExecStart"].split()[0]
    stub = root / exec_start.lstrip("/")
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return root


class TestLighthouseUnit:
    """The torchft lighthouse's unit (replica groups, ft.enabled) verifies and matches the miners'."""

    @pytest.mark.integration
    def test_verify_passes_and_settings(self, tmp_path: Path) -> None:
        analyze = need_tool("systemd-analyze")
        text = (DEPLOY / "systemd" / "minerd-lighthouse.service").read_text()
        root = verify_root(tmp_path, text, "minerd-lighthouse.service")
        out = run([analyze, "verify", f"--root={root}", "/etc/systemd/system/minerd-lighthouse.service"])
        assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr
        service = dict(unit_settings(text)["Service"])
        assert service["ExecStart"].startswith("/opt/minerd/.venv/bin/torchft_lighthouse --bind ")
        assert service["Restart"] == "always" and service["CapabilityBoundingSet"] == ""
        env = dict(v.split("=", 1) for k, v in unit_settings(text)["Service"] if k == "Environment")
        assert env["LIGHTHOUSE_BIND"].endswith(":29510") and int(env["LIGHTHOUSE_MIN_REPLICAS"]) >= 1

    @pytest.mark.integration
    def test_pm2_lists_it_only_when_asked(self) -> None:
        node = need_tool("node")
        script = ("const c=require(process.argv[1]);"
                  "console.log(JSON.stringify(c.apps.map(a=>[a.name,a.script,a.args])))")
        plain = run([node, "-e", script, str(ROOT / "ecosystem.config.js")])
        assert [a[0] for a in json.loads(plain.stdout)] == ["distributed_training_miner"]
        out = subprocess.run([node, "-e", script, str(ROOT / "ecosystem.config.js")], capture_output=True,
                             text=True, env={**os.environ, "MINERD_LIGHTHOUSE_MIN_REPLICAS": "3"}, timeout=30)
        apps = json.loads(out.stdout)
        assert apps[1][0] == "minerd_lighthouse" and apps[1][1].endswith(".venv/bin/torchft_lighthouse")
        assert apps[1][2][apps[1][2].index("--min_replicas") + 1] == "3"


class TestAggregatorUnit:
    """The bucket exchange's aggregator: a unit that verifies, and a pm2 app listed only when asked."""

    @pytest.mark.integration
    def test_verify_passes_and_settings(self, tmp_path: Path) -> None:
        analyze = need_tool("systemd-analyze")
        text = (DEPLOY / "systemd" / "minerd-aggregator.service").read_text()
        root = verify_root(tmp_path, text, "minerd-aggregator.service")
        out = run([analyze, "verify", f"--root={root}", "/etc/systemd/system/minerd-aggregator.service"])
        assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr
        service = dict(unit_settings(text)["Service"])
        assert service["ExecStart"] == "/opt/minerd/.venv/bin/minerd aggregate $MINERD_ARGS"
        assert service["RestartPreventExitStatus"] == "2" and service["CapabilityBoundingSet"] == ""
        env = dict(v.split("=", 1) for k, v in unit_settings(text)["Service"] if k == "Environment")
        assert env["MINERD_EXCHANGE__ENABLED"] == "true" and env["MINERD_API__PORT"] != "9108"
        unit = tmp_path / "minerd-aggregator.service"
        unit.write_text(text)
        out = run([analyze, "security", "--offline=yes", "--no-pager", str(unit)])
        match = re.search(r"Overall exposure level for minerd-aggregator.service: (\d+\.\d+)", out.stdout + out.stderr)
        assert match and float(match.group(1)) <= 2.5, out.stdout[-3000:]

    @pytest.mark.integration
    def test_pm2_lists_it_only_when_asked(self) -> None:
        node = need_tool("node")
        script = ("const c=require(process.argv[1]);"
                  "console.log(JSON.stringify(c.apps.map(a=>[a.name,a.script,a.args,a.env])))")
        plain = run([node, "-e", script, str(ROOT / "ecosystem.config.js")])
        assert "minerd_aggregator" not in [a[0] for a in json.loads(plain.stdout)]
        out = subprocess.run([node, "-e", script, str(ROOT / "ecosystem.config.js")], capture_output=True,
                             text=True, env={**os.environ, "MINERD_AGGREGATOR": "1"}, timeout=30)
        (app,) = [a for a in json.loads(out.stdout) if a[0] == "minerd_aggregator"]
        assert app[1].endswith(".venv/bin/minerd") and app[2] == "aggregate"
        assert app[3]["MINERD_EXCHANGE__ENABLED"] == "true" and app[3]["MINERD_API__PORT"] == "9118"


class TestSystemdUnit:
    """The unit passes `systemd-analyze verify` and carries the settings the miner relies on."""

    @pytest.mark.integration
    def test_verify_passes_without_a_warning(self, tmp_path: Path) -> None:
        analyze = need_tool("systemd-analyze")
        root = verify_root(tmp_path, UNIT.read_text())
        out = run([analyze, "verify", f"--root={root}", "/etc/systemd/system/minerd.service"])
        assert out.returncode == 0, out.stdout + out.stderr
        # verify exits 0 on unknown keys and bad values, it only prints them: any output is a finding.
        assert out.stdout + out.stderr == ""

    @pytest.mark.integration
    def test_verify_reports_a_broken_unit(self, tmp_path: Path) -> None:
        analyze = need_tool("systemd-analyze")
        broken = UNIT.read_text().replace("Type=notify", "Type=notifyy").replace("NoNewPrivileges", "NoNewPrivilege")
        root = verify_root(tmp_path, broken)
        out = run([analyze, "verify", f"--root={root}", "/etc/systemd/system/minerd.service"])
        assert "notifyy" in out.stderr
        assert "NoNewPrivilege" in out.stderr

    @pytest.mark.integration
    def test_verify_reports_a_missing_binary(self, tmp_path: Path) -> None:
        analyze = need_tool("systemd-analyze")
        root = verify_root(tmp_path, UNIT.read_text())
        (root / "opt/minerd/.venv/bin/minerd").unlink()
        out = run([analyze, "verify", f"--root={root}", "/etc/systemd/system/minerd.service"])
        assert out.returncode != 0
        assert "/opt/minerd/.venv/bin/minerd" in out.stderr

    def test_notify_watchdog_restart_and_stop_settings(self) -> None:
        s = unit_settings(UNIT.read_text())
        service = dict(s["Service"])
        unit = dict(s["Unit"])
        assert service["Type"] == "notify"
        assert service["NotifyAccess"] == "main"
        assert service["Restart"] == "on-failure"
        assert seconds(service["RestartSec"]) > 0
        assert seconds(service["WatchdogSec"]) > Config().watchdog.stall_seconds
        assert seconds(service["TimeoutStopSec"]) > SHUTDOWN_DEADLINE_S
        assert "2" in service["RestartPreventExitStatus"].split()
        assert {"StartLimitIntervalSec", "StartLimitBurst"} <= set(unit)
        assert not {"StartLimitIntervalSec", "StartLimitBurst"} & set(service)
        assert service["ExecStart"].startswith("/opt/minerd/.venv/bin/minerd run")

    def test_dedicated_user_environment_and_hardening(self) -> None:
        s = unit_settings(UNIT.read_text())["Service"]
        service = dict(s)
        env = dict(v.split("=", 1) for k, v in s if k == "Environment")
        assert service["User"] == "minerd"
        assert service["EnvironmentFile"] == "-/etc/minerd/minerd.env"
        state_dir = env["MINERD_PATHS__STATE_DIR"]
        assert state_dir == "/var/lib/minerd"
        assert state_dir in service["ReadWritePaths"].split()
        assert service["ProtectSystem"] == "strict"
        for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
            assert service[key] == "yes", key
        assert "PrivateDevices" not in service, "PrivateDevices hides /dev/nvidia*"
        assert service["CapabilityBoundingSet"] == "" and service["ProtectProc"] == "invisible"
        filters = [v for k, v in s if k == "SystemCallFilter"]
        assert service["ProcSubset"] == "pid" and filters == ["@system-service", "~@privileged"]
        # The token as a systemd credential, read by the miner from the credentials directory.
        assert service["LoadCredential"] == "api-token:/etc/minerd/api-token"
        assert env["MINERD_API__TOKEN_FILE"] == "%d/api-token" and "token_file" in config_fields("api")

    @pytest.mark.integration
    def test_security_exposure_is_low(self, tmp_path: Path) -> None:
        """systemd's own review scores the unit's exposure; 5.7 (MEDIUM) before the system-call
        filter, the empty capability set and the /proc restrictions."""
        analyze = need_tool("systemd-analyze")
        unit = tmp_path / "minerd.service"
        unit.write_text(UNIT.read_text())
        out = run([analyze, "security", "--offline=yes", "--no-pager", str(unit)])
        match = re.search(r"Overall exposure level for minerd.service: (\d+\.\d+)", out.stdout + out.stderr)
        assert match, out.stdout[-2000:] + out.stderr[-2000:]
        assert float(match.group(1)) <= 2.5, out.stdout[-3000:]

    def test_env_example_names_only_real_config_keys(self) -> None:
        text = (DEPLOY / "systemd" / "minerd.env.example").read_text()
        keys = re.findall(r"^#?(MINERD_[A-Z0-9_]+__[A-Z0-9_]+)=", text, re.M)
        assert len(keys) >= 5
        for key in keys:
            section, field = key[len("MINERD_") :].lower().split("__", 1)
            assert field in config_fields(section), key


# --- pm2 -----------------------------------------------------------------------------------------
class TestEcosystem:
    """ecosystem.config.js loads in node and describes the miner as pm2 must run it."""

    @pytest.mark.integration
    def test_single_process_app(self) -> None:
        apps = load_ecosystem({"MINERD_NPROC_PER_NODE": ""})["apps"]
        assert [a["name"] for a in apps] == ["distributed_training_miner"]
        app = apps[0]
        assert app["script"] == str(ROOT / ".venv" / "bin" / "minerd")
        assert app["args"] == "run"
        assert app["interpreter"] == "none"
        assert app["cwd"] == str(ROOT)
        assert app["env"]["PYTHONUNBUFFERED"] == "1"
        assert app["autorestart"] is True
        assert app["kill_timeout"] / 1000 > SHUTDOWN_DEADLINE_S
        assert app["exp_backoff_restart_delay"] > 0
        assert seconds(str(app["min_uptime"])) >= 5
        assert 0 < app["max_restarts"] <= 16
        assert app["log_date_format"]
        # clean stop and bad config are final; runtime failure (1) and stall (3) are restarted
        assert set(app["stop_exit_codes"]) == {0, 2}

    def test_env_examples_are_real_config_keys(self) -> None:
        text = (ROOT / "ecosystem.config.js").read_text()
        for key in re.findall(r"(MINERD_[A-Z0-9_]+__[A-Z0-9_]+)", text):
            section, field = key[len("MINERD_") :].lower().split("__", 1)
            assert field in config_fields(section), key

    @pytest.mark.integration
    def test_torchrun_app_for_several_gpus(self) -> None:
        apps = load_ecosystem({"MINERD_NPROC_PER_NODE": "4"})["apps"]
        assert [a["name"] for a in apps] == ["distributed_training_miner_multigpu"]
        app = apps[0]
        assert app["script"] == str(ROOT / ".venv" / "bin" / "torchrun")
        assert app["args"] == ["--standalone", "--nproc_per_node=4", "-m", "daemon", "run"]
        assert app["interpreter"] == "none"
        # one signal per rank: torchrun forwards pm2's, so pm2 must not signal the ranks as well
        assert app["treekill"] is False
        torchrun_grace = float(app["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
        assert SHUTDOWN_DEADLINE_S < torchrun_grace < app["kill_timeout"] / 1000

    @pytest.mark.integration
    def test_paths_follow_the_clone(self, tmp_path: Path) -> None:
        node = need_tool("node")
        shutil.copy(ROOT / "ecosystem.config.js", tmp_path / "ecosystem.config.js")
        out = run(
            [node, "-e", "console.log(JSON.stringify(require(process.argv[1])))", str(tmp_path / "ecosystem.config.js")]
        )
        assert out.returncode == 0, out.stderr
        app = json.loads(out.stdout)["apps"][0]
        assert app["cwd"] == str(tmp_path)
        assert app["script"] == str(tmp_path / ".venv" / "bin" / "minerd")


# --- Grafana -------------------------------------------------------------------------------------
class TestDashboard:
    """The dashboard imports anywhere (no ${DS_} inputs), and its queries name real metrics."""

    def test_valid_json_with_variables_not_inputs(self) -> None:
        text = DASHBOARD.read_text()
        assert "${DS_" not in text and "__inputs" not in text
        d = load_dashboard()
        assert d["uid"] and d["title"] and d["schemaVersion"] >= 30
        variables = {v["name"]: v for v in d["templating"]["list"]}
        ds = variables["datasource"]
        assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
        inst = variables["instance"]
        assert inst["type"] == "query"
        assert inst["query"] == "label_values(minerd_info, instance)"
        assert inst["datasource"]["uid"] == "${datasource}"

    def test_every_panel_and_query_uses_the_datasource_variable(self) -> None:
        d = load_dashboard()
        panels = [p for p in d["panels"] if p["type"] != "row"]
        assert len(panels) >= 15
        for p in panels:
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], p["title"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}", p["title"]

    def test_every_selector_is_filtered_by_instance(self) -> None:
        for title, expr in dashboard_targets(load_dashboard()):
            for match in re.finditer(r"\b(minerd_[a-z0-9_]+)(\{[^}]*\})?", expr):
                assert match.group(2) and 'instance="$instance"' in match.group(2), (title, expr)

    def test_queries_use_only_contract_metrics(self) -> None:
        allowed = contract_metric_names()
        used = {m for _, expr in dashboard_targets(load_dashboard()) for m in METRIC_NAME.findall(expr)}
        assert used - allowed == set()

    def test_covers_the_panels_operators_need(self) -> None:
        used = {m for _, expr in dashboard_targets(load_dashboard()) for m in METRIC_NAME.findall(expr)}
        exprs = " ".join(expr for _, expr in dashboard_targets(load_dashboard()))
        needed = {
            "minerd_step_duration_seconds_bucket",
            "minerd_samples_total",
            "minerd_loss",
            "minerd_learning_rate",
            "minerd_separation_margin",
            "minerd_tokens_total",
            "minerd_eval_loss",
            "minerd_eval_bits_per_byte",
            "minerd_mfu_ratio",
            "minerd_inner_step",
            "minerd_outer_step",
            "minerd_gpu_memory_allocated_bytes",
            "minerd_gpu_memory_total_bytes",
            "minerd_gpu_utilization_ratio",
            "minerd_model_on_accelerator",
            "minerd_mining_queue_depth",
            "minerd_mining_batches_total",
            "minerd_mining_search_seconds_bucket",
            "minerd_embedding_cache_requests_total",
            "minerd_upload_attempts_total",
            "minerd_last_upload_timestamp_seconds",
            "minerd_last_checkpoint_timestamp_seconds",
        }
        assert needed - used == set()
        assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.95," in exprs
        assert "time() - minerd_last_checkpoint_timestamp_seconds" in exprs
        assert "time() - minerd_last_upload_timestamp_seconds" in exprs

    @pytest.mark.integration
    def test_every_query_is_valid_promql(self, tmp_path: Path) -> None:
        """Filled in as Grafana sends them, the queries parse: promtool checks them as recording rules."""
        promtool = need_tool("promtool")
        rules = [
            {"record": f"dashboard:query_{i}", "expr": fill_dashboard_variables(expr, instance="127.0.0.1:9108")}
            for i, (_, expr) in enumerate(dashboard_targets(load_dashboard()))
        ]
        path = tmp_path / "dashboard_rules.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        out = run([promtool, "check", "rules", str(path)])
        assert out.returncode == 0, out.stdout + out.stderr

    def test_provisioning_files(self) -> None:
        prov = DEPLOY / "grafana" / "provisioning"
        ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
        assert ds["type"] == "prometheus" and ds["uid"]
        provider = yaml.safe_load((prov / "dashboards" / "minerd.yml").read_text())["providers"][0]
        assert provider["type"] == "file"
        assert provider["options"]["path"]


class TestInstallScript:
    """.ci/install-tools.sh is valid bash and never starts a service."""

    @pytest.mark.integration
    def test_syntax(self) -> None:
        out = run(["bash", "-n", str(ROOT / ".ci" / "install-tools.sh")])
        assert out.returncode == 0, out.stderr

    def test_starts_no_service_and_installs_pm2_locally(self) -> None:
        text = (ROOT / ".ci" / "install-tools.sh").read_text()
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert "policy-rc.d" in code and "exit 101" in code
        assert not re.search(r"systemctl\s+(start|enable|restart)|service\s+\S+\s+start", code)
        assert "npm install --prefix" in code and " -g " not in code
