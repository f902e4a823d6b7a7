"""The body of each of the bundle's six sections, for ``minerd bundle``.

One ``section_*`` function per section, each returning Markdown lines: GPU diagnostics (this
machine, the CUDA test, the block the miner logged, the running miner's ``/diagnostics``,
``nvidia-smi``), the last training steps, recent warnings and errors, the upload history (the
target's ``LATEST`` and revisions), the configuration with secrets masked, and the versions of
everything around the miner. torch is imported inside the functions that need it.
"""

from __future__ import annotations

import datetime as dt
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from daemon import __version__
from daemon.bundle.logs import LogSources, diagnostics_block, problem_lines, step_lines, upload_lines
from daemon.bundle.redact import _mask_url
from daemon.config import Config

MAX_REVISIONS = 10


def _fence(lines: Iterable[str], lang: str = "") -> list[str]:
    body = [line.replace("```", "'''") for line in lines]
    return [f"```{lang}", *(body or ["(nothing)"]), "```"]


def _expected_device(cfg: Config) -> str:
    import torch

    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return cfg.train.device if cfg.train.device.startswith("cuda:") else "cuda:0"


def _world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _run_tool(args: Sequence[str], timeout: float = 15) -> tuple[str | None, str]:
    """(output, how it went); None when the tool is missing."""
    exe = shutil.which(args[0])
    if exe is None:
        return None, f"{args[0]}: not found on PATH"
    try:
        proc = subprocess.run(
            [exe, *args[1:]], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{args[0]}: {exc}"
    return (proc.stdout + proc.stderr).rstrip(), f"exit {proc.returncode}"


def section_diagnostics(cfg: Config, logs: LogSources, api: str | None, live: dict[str, Any]) -> list[str]:
    import torch

    from daemon import diagnostics

    out: list[str] = []
    device = _expected_device(cfg)
    diag = diagnostics.collect(cfg, torch.device(device), _world_size())
    out += [
        f"This machine, as `minerd bundle` sees it (model device = the device `minerd run` would pick "
        f"with this config: {device}):",
        "",
    ]
    out += _fence(diagnostics.render(diag))
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    out += ["", "CUDA test:", ""]
    out += _fence([f"CUDA: {torch.cuda.is_available()}, Count: {torch.cuda.device_count()}, Device: {name}"])
    out += ["", 'Logged by the miner at its last start (`grep -A 20 "GPU DIAGNOSTICS"`):', ""]
    block = diagnostics_block(logs.lines)
    out += _fence(
        [line.event if line.record is not None else line.text for line in block]
        if block
        else ["(no GPU DIAGNOSTICS block in the logs read)"]
    )
    out += ["", f"Running miner's /diagnostics ({api or 'no API address in the config'}):", ""]
    if "diagnostics" in live:
        out += _fence(json.dumps(live["diagnostics"], indent=2).splitlines(), "json")
    else:
        out += [f"not available: {live.get('diagnostics_error', 'no API address')}"]
    smi, how = _run_tool(["nvidia-smi"])
    out += ["", f"nvidia-smi ({how}):", ""]
    out += _fence((smi or "").splitlines() if smi is not None else [how])
    return out


def section_steps(logs: LogSources, live: dict[str, Any]) -> list[str]:
    steps = step_lines(logs.lines)
    out = [f"The last {len(steps)} `Outer Step:` lines of the logs read:", ""]
    out += _fence(line.render() for line in steps)
    status = live.get("status")
    if isinstance(status, dict):
        keys = (
            "phase",
            "outer_step",
            "inner_step",
            "global_step",
            "epoch",
            "loss",
            "learning_rate",
            "last_step_seconds",
            "samples_per_second",
            "tokens_per_second",
            "mfu",
            "eval",
            "eval_global_step",
            "model_on_accelerator",
            "device",
            "uptime_seconds",
        )
        out += ["", "Running miner's /status (progress fields):", ""]
        out += _fence(json.dumps({k: status[k] for k in keys if k in status}, indent=2).splitlines(), "json")
    return out


def section_problems(logs: LogSources) -> list[str]:
    problems = problem_lines(logs.lines)
    out = [
        f"The last {len(problems)} distinct warnings/errors (level warning or above, or text matching "
        "warning|error|exception|traceback|RED FLAG|SLOW STEP|LOW GPU MEMORY|out of memory), oldest "
        "first; lines differing only in numbers are shown once, at their last occurrence, with a count:",
        "",
    ]
    out += _fence((f"(x{count}) " if count > 1 else "") + line.render() for line, count in problems)
    return out


def section_uploads(cfg: Config, logs: LogSources, live: dict[str, Any]) -> list[str]:
    up = cfg.upload
    target = up.target or str(cfg.state_dir / "uploads")
    out = [
        f"upload.enabled={up.enabled}, backend={up.backend}, target={_mask_url(target)}, "
        f"min_inner_step={up.min_inner_step}, every_inner_steps={up.every_inner_steps}, "
        f"max_age_seconds={up.max_age_seconds}",
        "",
    ]
    out += _upload_target(target, up.endpoint_url, up.max_age_seconds)
    status = live.get("status")
    if isinstance(status, dict) and status.get("upload") is not None:
        out += ["", "Running miner's upload state (/status):", ""]
        out += _fence(json.dumps(status["upload"], indent=2, default=str).splitlines(), "json")
    lines = upload_lines(logs.lines)
    out += ["", f"The last {len(lines)} upload lines of the logs (UPLOAD START/OK/FAILED/BLOCKED):", ""]
    out += _fence(line.render() for line in lines)
    return out


def _upload_target(target: str, endpoint_url: str, max_age: float) -> list[str]:
    from daemon.storage import StorageError, open_storage, revision_key
    from daemon.upload.revision import read_manifest, read_pointer

    if not target.startswith("s3://") and not Path(target).is_dir():
        return [f"Target {target}: does not exist (nothing uploaded yet, or another state_dir/target)."]
    try:
        storage = open_storage(target, endpoint_url)
        latest = read_pointer(storage)
        names = storage.list_revisions()
    except (StorageError, OSError, ValueError) as exc:
        return [f"Target {_mask_url(target)}: cannot read it: {exc}"]
    names = sorted(names, key=lambda n: revision_key(n) or (-1, -1))
    rows: list[str] = []
    now = dt.datetime.now(dt.UTC).timestamp()
    for name in names[-MAX_REVISIONS:][::-1]:
        try:
            meta = read_manifest(storage, name)
        except (StorageError, OSError, ValueError) as exc:
            rows.append(f"| {name} | unreadable metadata.json: {exc} | | | | |")
            continue
        if meta is None:
            rows.append(f"| {name} | no metadata.json (incomplete revision) | | | | |")
            continue
        created = meta.get("created_at_unix")
        age = f"{now - float(created):.0f}" if isinstance(created, int | float) else "?"
        size = sum(int(f.get("size", 0)) for f in (meta.get("files") or {}).values() if isinstance(f, dict))
        loss = meta.get("loss")
        rows.append(
            f"| {name}{' (LATEST)' if name == latest else ''} | {meta.get('created_at', '?')} | {age} | "
            f"{meta.get('outer_step', '?')}/{meta.get('inner_step', '?')} | "
            f"{loss if not isinstance(loss, float) else f'{loss:.4f}'} | {size} |"
        )
    out = [
        f"Target {_mask_url(storage.describe())}: LATEST = {latest or '(none)'}; "
        f"{len(names)} revision(s), newest {min(len(names), MAX_REVISIONS)} shown. Validators reject a "
        f"revision older than about {max_age:.0f} s (upload.max_age_seconds).",
        "",
    ]
    if rows:
        out += ["| revision | created_at | age (s) | outer/inner | loss | bytes |", "|---|---|---|---|---|---|", *rows]
    if latest:
        try:
            meta = read_manifest(storage, latest)
        except (StorageError, OSError, ValueError) as exc:
            meta = {"error": str(exc)}
        out += ["", f"{latest}/metadata.json:", ""]
        out += _fence(json.dumps(meta, indent=2, sort_keys=True).splitlines(), "json")
    return out


def section_config(cfg: Config, problems: Sequence[str], origin: str) -> list[str]:
    data = cfg.public_dict()
    data["upload"]["endpoint_url"] = _mask_url(str(data["upload"].get("endpoint_url", "")))
    data["upload"]["target"] = _mask_url(str(data["upload"].get("target", "")))
    out = [origin, ""]
    if problems:
        out += ["The config did not validate; the built-in defaults are shown instead. Problems:", ""]
        out += _fence(problems)
        out.append("")
    out += _fence(yaml.safe_dump(data, sort_keys=False).splitlines(), "yaml")
    return out


def _dist_version(*names: str) -> str:
    for name in names:
        try:
            return f"{importlib.metadata.version(name)} ({name})"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def section_versions() -> list[str]:
    import torch

    rows = [
        ("minerd", __version__),
        ("Python", sys.version.replace("\n", " ")),
        ("executable", sys.executable),
        ("platform", platform.platform()),
        ("machine", platform.machine()),
        ("torch", torch.__version__),
        ("CUDA (torch built with)", str(torch.version.cuda)),
        ("CUDA available", f"{torch.cuda.is_available()} (devices: {torch.cuda.device_count()})"),
        ("cuDNN", str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "n/a"),
    ]
    try:
        faiss = importlib.import_module("faiss")
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        rows.append(("faiss", f"{getattr(faiss, '__version__', '?')} (GPUs seen by faiss: {gpus})"))
    except Exception as exc:  # an import failure is itself worth reporting
        rows.append(("faiss", f"import failed: {exc}"))
    rows += [
        ("faiss package", _dist_version("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss")),
        ("numpy", _dist_version("numpy")),
        ("prometheus-client", _dist_version("prometheus-client", "prometheus_client")),
        ("fastapi", _dist_version("fastapi")),
        ("uvicorn", _dist_version("uvicorn")),
        ("pydantic", _dist_version("pydantic")),
        ("boto3", _dist_version("boto3")),
        ("nvidia-ml-py", _dist_version("nvidia-ml-py")),
    ]
    smi, _ = _run_tool(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"])
    rows.append(("NVIDIA driver", smi.splitlines()[0] if smi else "n/a (no nvidia-smi)"))
    return ["| component | version |", "|---|---|", *(f"| {k} | {v.replace('|', '/')} |" for k, v in rows)]
