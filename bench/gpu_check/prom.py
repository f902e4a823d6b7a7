"""A real Prometheus scraping the running miner, and the Grafana GPU panels' queries to ask it.

The binary is the one `.ci/install-tools.sh` installs (Debian's `prometheus`). It runs on a
loopback port with its own data directory under the check's folder, and is stopped by its pid.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.gpu_check.procs import ROOT, Child, Children

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "minerd.json"
# Series a miner exports only on a GPU: their panels are empty on a CPU by design.
GPU_ONLY = re.compile(r"\bminerd_(gpu_[a-z_]+|mfu_ratio)\b")
GPU_ROW = "GPU"


def gpu_panels(dashboard: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    """(title, queries) of the panels in the dashboard's GPU row, and of any other panel that
    shows a GPU-only series (MFU sits with the language model's panels)."""
    found: list[tuple[str, list[str]]] = []

    def exprs(panel: Mapping[str, Any]) -> list[str]:
        return [str(t["expr"]) for t in panel.get("targets", []) if t.get("expr")]

    def walk(panels: Sequence[Mapping[str, Any]], in_gpu_row: bool) -> None:
        for panel in panels:
            if panel.get("type") == "row":
                # An open row is followed by its panels; a collapsed one holds them inside.
                in_gpu_row = str(panel.get("title", "")).strip() == GPU_ROW
                walk(panel.get("panels", []), in_gpu_row)
                continue
            queries = exprs(panel)
            if queries and (in_gpu_row or any(GPU_ONLY.search(q) for q in queries)):
                found.append((str(panel.get("title", "")), queries))

    walk(dashboard.get("panels", []), False)
    return found


def fill(expr: str, instance: str, rate_interval: str = "1m") -> str:
    """A panel's query as Grafana sends it: $instance and $__rate_interval filled in."""
    out = expr.replace("${__rate_interval}", rate_interval).replace("$__rate_interval", rate_interval)
    out = out.replace("${instance}", instance).replace("$instance", instance)
    left = re.search(r"\$\{?\w+", out)
    if left:
        raise ValueError(f"unfilled variable {left.group(0)} in {expr!r}")
    return out


def binary() -> str | None:
    return shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """One Prometheus scraping ``target`` (host:port) every second."""

    def __init__(self, kids: Children, workdir: Path, target: str) -> None:
        path = binary()
        if path is None:
            raise FileNotFoundError("prometheus not found: run `bash .ci/install-tools.sh` (as root) to install it")
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "minerd", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [target]}]}],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.port = free_port()
        self.child: Child = kids.start("prometheus", [
            path, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h", "--log.level=warn",
        ], workdir / "prometheus.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.child.returncode is not None:
                raise RuntimeError(f"prometheus exited with {self.child.returncode}: {self.child.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready after {timeout:.0f} s: {self.child.tail()}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's series (a scalar answer counts as one)."""
        params = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=10) as resp:
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise RuntimeError(f"query {expr!r}: {body.get('error', body)}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def series(self, exprs: Sequence[str], timeout: float) -> Iterator[tuple[str, int]]:
        """(query, number of series) for each query, each polled until it answers or time runs out."""
        end = time.monotonic() + timeout
        for expr in exprs:
            while True:
                count = len(self.query(expr))
                if count or time.monotonic() > end:
                    yield expr, count
                    break
                time.sleep(0.5)

    def stop(self) -> None:
        self.child.stop(15)
