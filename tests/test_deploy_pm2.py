"""The repository's ecosystem.config.js runs the real miner under the real pm2.

`pm2 start ecosystem.config.js --only distributed_training_miner` against the repo's .venv, with a
private PM2_HOME (killed afterwards by its own `pm2 kill`) and its own state directory. The miner
gets a small fast config through the environment pm2 passes on (MINERD_<SECTION>__<KEY>), which is
how operators configure it under pm2 too. Checked: online and /readyz 200; `pm2 logs` shows step
lines; `pm2 restart` resumes from the checkpoint; `pm2 stop` exits 0 inside kill_timeout with a
checkpoint written.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from daemon.logsetup import json_records
from tests.conftest import small_lm_sets
from tests.deploy_tools import ROOT, Pm2, free_port, load_ecosystem, pm2_session

pytestmark = [pytest.mark.integration, pytest.mark.slow]

APP = "distributed_training_miner"
RESUMED = re.compile(r"Resumed from checkpoint at outer step (\d+), inner step (\d+) \(global step (\d+)\)")


def small_env(state_dir: Path, port: int) -> dict[str, str]:
    """The small language-model job of tests/conftest.py (the default task), as the
    environment variables minerd reads (MINERD_<SECTION>__<KEY>)."""
    env = {}
    for item in small_lm_sets(state_dir, f"api.port={port}", "checkpoint.every_inner_steps=50"):
        key, _, value = item.partition("=")
        section, name = key.split(".")
        env[f"MINERD_{section.upper()}__{name.upper()}"] = value
    return env


def get(url: str, timeout: float = 2) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


def wait_ready(pm2: Pm2, api: str, *, not_pid: int | None = None, timeout: float = 120) -> dict[str, Any]:
    """Waits until the app is online (with a pid other than `not_pid`) and /readyz answers 200."""
    end = time.monotonic() + timeout
    app: dict[str, Any] | None = None
    while time.monotonic() < end:
        app = pm2.app(APP)
        if app is not None:
            status = app["pm2_env"]["status"]
            assert status not in ("errored", "stopped"), f"{APP} is {status}:\n{pm2.logs(APP, 60)}"
            if status == "online" and app["pid"] and app["pid"] != not_pid:
                with contextlib.suppress(OSError):
                    if get(f"{api}/readyz")[0] == 200:
                        return app
        time.sleep(0.5)
    raise AssertionError(f"{APP} not ready after {timeout}s: {app and app['pm2_env']['status']}\n{pm2.logs(APP, 60)}")


def log_files(pm2: Pm2) -> str:
    """Both of pm2's log files for the app (pm2 names them with '-' for '_')."""
    logs = pm2.home / "logs"
    return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("distributed-training-miner-*.log")))


def records(text: str) -> list[dict[str, Any]]:
    """The JSON log records in pm2's log text (each line prefixed with log_date_format's time)."""
    return json_records(text)


def test_start_logs_restart_stop(tmp_path: Path) -> None:
    ecosystem = load_ecosystem()
    (miner,) = [a for a in ecosystem["apps"] if a["name"] == APP]
    kill_timeout_s = int(miner["kill_timeout"]) / 1000
    state_dir = tmp_path / "state"
    port = free_port()
    api = f"http://127.0.0.1:{port}"

    with pm2_session(small_env(state_dir, port)) as pm2:
        # start: the repo's own ecosystem file, only the single-process app.
        pm2.run("start", str(ROOT / "ecosystem.config.js"), "--only", APP)
        app = wait_ready(pm2, api)
        pid = int(app["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[0].decode().startswith(str(ROOT / ".venv" / "bin")), cmdline  # the venv's python
        assert cmdline[1].decode() == str(ROOT / ".venv" / "bin" / "minerd") and cmdline[2] == b"run", cmdline
        assert app["pm2_env"]["pm_cwd"] == str(ROOT)

        # pm2 logs: step lines, as users grep them.
        end = time.monotonic() + 30
        while "Outer Step:" not in (logs := pm2.logs(APP, lines=100)) and time.monotonic() < end:
            time.sleep(0.5)
        assert re.search(r"Outer Step: \d+ \| Inner Step: \d+ \| LR: [\d.]+ \| Loss: ", logs), logs[-3000:]

        # restart: SIGINT, a final checkpoint, a new process that resumes from it.
        _, before = get(f"{api}/status")
        pm2.run("restart", APP)
        app = wait_ready(pm2, api, not_pid=pid)
        text = log_files(pm2)
        resumed = RESUMED.search(text)
        assert resumed, text[-3000:]
        resumed_global = int(resumed.group(3))
        assert resumed_global >= int(before["global_step"]) > 0, (resumed.group(0), before["global_step"])
        _, after = get(f"{api}/status")
        assert after["global_step"] >= resumed_global  # counting on from the checkpoint, not from 0
        assert (after["outer_step"], after["inner_step"]) >= (int(resumed.group(1)), int(resumed.group(2)))

        # stop: exit 0 inside kill_timeout (pm2 would SIGKILL after it), a checkpoint written.
        pid = int(app["pid"])
        started = time.monotonic()
        pm2.run("stop", APP, timeout=kill_timeout_s + 30)
        took = time.monotonic() - started
        app = pm2.wait_status(APP, "stopped", timeout=10)
        assert took < kill_timeout_s, f"pm2 stop took {took:.1f}s, kill_timeout is {kill_timeout_s}s"
        assert app["pm2_env"].get("exit_code") == 0, app["pm2_env"].get("exit_code")
        daemon_log = (pm2.home / "pm2.log").read_text()
        assert f"App [{APP}:0] exited with code [0] via signal [SIGINT]" in daemon_log, daemon_log[-2000:]
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        text = log_files(pm2)
        events = records(text)
        # the restart's and the stop's ends of training; each left a checkpoint at its last step
        # (saved at the stop, or by the periodic save of that very step just before it)
        stops = [r["global_step"] for r in events if r.get("event") == "training stopped"]
        assert len(stops) == 2, text[-3000:]
        assert (state_dir / "checkpoints" / f"step-{int(stops[-1]):010d}").is_dir(), sorted(
            p.name for p in (state_dir / "checkpoints").iterdir()
        )
        assert int(stops[-1]) >= after["global_step"]
        assert [r["exit_code"] for r in events if r.get("event") == "minerd stopped"] == [0, 0]
