"""Helpers for the deployment tests: find the real tools, run a loopback Prometheus, run pm2 privately.

Every process started here is stopped by its own pid (Prometheus) or by its own `pm2 kill`
against its own PM2_HOME (pm2): never by name, so nothing else on the machine is touched.

Tools come from `.ci/install-tools.sh`: promtool/prometheus (Debian `prometheus`), systemd-analyze
(Debian `systemd`), node (Debian/nodesource), and pm2 in `.tools/node_modules/.bin/pm2`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "minerd.json"
PM2_LOCAL = ROOT / ".tools" / "node_modules" / ".bin" / "pm2"

INSTALL_HINT = "run `bash .ci/install-tools.sh` (as root) to install it"


# --- finding tools -------------------------------------------------------------------------------
def tool_path(name: str) -> str | None:
    """Absolute path of a tool, or None. pm2 is looked for in .tools/ first, then on PATH."""
    if name == "pm2" and os.access(PM2_LOCAL, os.X_OK):
        return str(PM2_LOCAL)
    return shutil.which(name)


def tools_required() -> bool:
    """In CI (CI=true, as .ci/run is run) a missing tool is a failure, not a skip."""
    flag = os.environ.get("MINERD_REQUIRE_TOOLS") or os.environ.get("CI") or ""
    return flag.strip().lower() not in ("", "0", "false", "no")


def need_tool(name: str) -> str:
    """The tool's path; otherwise fail the test in CI, skip it with the reason elsewhere."""
    path = tool_path(name)
    if path:
        return path
    message = f"{name} not found: {INSTALL_HINT}"
    if tools_required():
        pytest.fail(f"{message} (CI is set, so a missing tool fails the suite)", pytrace=False)
    pytest.skip(message)


def tool_version(name: str) -> str:
    """First line of `<tool> --version`; pm2's from its package.json (running pm2 starts a daemon)."""
    if name == "pm2":
        pkg = PM2_LOCAL.resolve().parent.parent / "package.json"
        if pkg.is_file():
            return str(json.loads(pkg.read_text())["version"])
        return "unknown"
    path = tool_path(name)
    if path is None:
        return "missing"
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- dashboard queries ---------------------------------------------------------------------------
METRIC_NAME = re.compile(r"\bminerd_[a-zA-Z0-9_]+")


def dashboard_targets(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, rows' nested panels included."""

    def walk(panels: Sequence[Mapping[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    yield str(panel.get("title", "")), str(target["expr"])
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard.get("panels", []))


def fill_dashboard_variables(expr: str, *, instance: str, rate_interval: str = "1m") -> str:
    """A panel query as Grafana would send it, with $instance and $__rate_interval filled in (the
    GPU check fills them the same way)."""
    from bench.gpu_check.prom import fill

    return fill(expr, instance, rate_interval)


# --- Prometheus ----------------------------------------------------------------------------------
def prometheus_config(
    targets: Sequence[str],
    *,
    scrape_interval: str = "1s",
    evaluation_interval: str | None = None,
    job: str = "minerd",
    target_labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with its targets and intervals replaced, for a test server.

    The rule file keeps its name (alerts.yml); `write_prometheus_config` copies it beside the config.
    """
    cfg = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    cfg["global"]["scrape_interval"] = scrape_interval
    cfg["global"]["evaluation_interval"] = evaluation_interval or scrape_interval
    cfg["global"]["scrape_timeout"] = scrape_interval
    static: dict[str, Any] = {"targets": list(targets)}
    if target_labels:
        static["labels"] = dict(target_labels)
    cfg["scrape_configs"] = [{"job_name": job, "metrics_path": "/metrics", "static_configs": [static]}]
    return cfg


def write_prometheus_config(config: Mapping[str, Any], directory: Path) -> Path:
    """Writes prometheus.yml (+ the deploy alerts.yml it names) into `directory`; returns the config path."""
    directory.mkdir(parents=True, exist_ok=True)
    for rule_file in config.get("rule_files", []):
        shutil.copy(PROMETHEUS_DIR / rule_file, directory / rule_file)
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return path


@dataclass
class PrometheusServer:
    """A real Prometheus on 127.0.0.1:<port>, with its own data directory; stopped by its pid."""

    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log_path: Path
    _log: Any = field(repr=False, default=None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api(self, path: str, params: Mapping[str, str] | None = None, timeout: float = 10) -> Any:
        """GET /api/v1/<path>; returns `data`, raises AssertionError on an error status."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=timeout) as resp:
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus /api/v1/{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result vector (a scalar result comes back as one sample)."""
        data = self.api("query", {"query": expr})
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def active_targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets", {"state": "active"})["activeTargets"])

    def wait_ready(self, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp,
            ):
                if resp.status == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready after {timeout}s:\n{self.log()[-3000:]}")

    def wait_for_series(self, expr: str, timeout: float = 30) -> list[dict[str, Any]]:
        """Polls an instant query until it returns at least one series."""
        end = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > end:
                raise AssertionError(f"no series for {expr!r} after {timeout}s; targets: {self.active_targets()}")
            time.sleep(0.5)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM to our own pid (Prometheus shuts down cleanly on it), SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return int(self.proc.returncode)


def start_prometheus(config_path: Path, workdir: Path, *, ready_timeout: float = 30) -> PrometheusServer:
    """Starts `prometheus` on a free loopback port with a data dir under `workdir`; waits for /-/ready."""
    binary = need_tool("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    last_error: AssertionError | None = None
    for attempt in range(3):  # a free port can be taken by someone else before we bind it
        port = free_port()
        data_dir = workdir / f"data-{port}"
        log_path = workdir / f"prometheus-{port}.log"
        log = log_path.open("wb")
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={data_dir}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        server = PrometheusServer(proc=proc, port=port, data_dir=data_dir, log_path=log_path, _log=log)
        try:
            server.wait_ready(ready_timeout)
            return server
        except AssertionError as exc:
            server.stop()
            last_error = exc
            if "address already in use" not in server.log() or attempt == 2:
                raise
    raise AssertionError(f"prometheus did not start: {last_error}")


@contextlib.contextmanager
def running_prometheus(config_path: Path, workdir: Path) -> Iterator[PrometheusServer]:
    server = start_prometheus(config_path, workdir)
    try:
        yield server
    finally:
        server.stop()


# --- pm2 -----------------------------------------------------------------------------------------
class Pm2:
    """The real pm2 CLI against a private PM2_HOME: its daemon is this test's alone."""

    def __init__(self, home: Path, binary: str, env: Mapping[str, str] | None = None) -> None:
        self.home = home
        self.binary = binary
        self.env = {**os.environ, **(env or {}), "PM2_HOME": str(home)}

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.binary, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"pm2 {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def jlist(self) -> list[dict[str, Any]]:
        """`pm2 jlist`: one dict per app (name, pid, pm2_env.status, pm2_env.restart_time, ...)."""
        out = self.run("jlist").stdout
        start = out.find("[")  # pm2 may print a banner or warnings before the JSON
        return list(json.loads(out[start:])) if start >= 0 else []

    def app(self, name: str) -> dict[str, Any] | None:
        return next((a for a in self.jlist() if a.get("name") == name), None)

    def status(self, name: str) -> str | None:
        app = self.app(name)
        return None if app is None else str(app["pm2_env"]["status"])

    def wait_status(self, name: str, wanted: str, timeout: float = 60) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            app = self.app(name)
            if app is not None and app["pm2_env"]["status"] == wanted:
                return app
            if time.monotonic() > end:
                raise AssertionError(f"pm2 app {name} not {wanted} after {timeout}s: {app and app['pm2_env']}")
            time.sleep(0.5)

    def logs(self, name: str, lines: int = 200) -> str:
        """`pm2 logs NAME --lines N --nostream`: what a user sees, without following."""
        proc = self.run("logs", name, "--lines", str(lines), "--nostream", "--raw")
        return proc.stdout + proc.stderr

    def daemon_pid(self) -> int | None:
        pid_file = self.home / "pm2.pid"
        try:
            return int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def kill(self, timeout: float = 60) -> None:
        """`pm2 kill` on our PM2_HOME: stops our apps (with their kill_timeout) and our daemon.

        If that daemon is still alive afterwards, its own pid (from our pm2.pid) gets SIGKILL.
        """
        pid = self.daemon_pid()
        if pid is None and not (self.home / "rpc.sock").exists():
            return  # no daemon was ever started under this home
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.run("kill", check=False, timeout=timeout)
        if pid is None:
            return
        end = time.monotonic() + 10  # `pm2 kill` returns while its daemon is still exiting
        while _alive(pid) and time.monotonic() < end:
            time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) also answers signal 0.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return False
    return True


@contextlib.contextmanager
def pm2_session(env: Mapping[str, str] | None = None) -> Iterator[Pm2]:
    """A private pm2 (PM2_HOME in a fresh short temp dir: pm2's unix sockets need a short path),
    killed with its own `pm2 kill` and removed afterwards."""
    binary = need_tool("pm2")
    need_tool("node")
    home = Path(tempfile.mkdtemp(prefix="pm2-", dir="/tmp"))
    pm2 = Pm2(home, binary, env)
    try:
        yield pm2
    finally:
        pm2.kill()
        shutil.rmtree(home, ignore_errors=True)


def load_ecosystem(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """ecosystem.config.js as pm2 sees it: evaluated by node, printed as JSON."""
    node = need_tool("node")
    script = "process.stdout.write(JSON.stringify(require(process.argv[1])))"
    proc = subprocess.run(
        [node, "-e", script, str(ROOT / "ecosystem.config.js")],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        raise AssertionError(f"node could not load ecosystem.config.js:\n{proc.stderr}")
    return dict(json.loads(proc.stdout))
