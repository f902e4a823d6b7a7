"""A local Hugging Face model directory that a task continues from: checked before anything
of it is loaded. The directory is the operator's, but its files may come from anywhere (a
hub cache, a peer's revision), so it is bounded and never runs code."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
# A model's config.json and tokenizer_config.json are KBs (a long chat template makes the
# latter tens of KB); anything near this is not one of them.
MAX_CONFIG_BYTES = 16 << 20
# The files transformers reads an ``auto_map`` (the model's own Python code) from.
CODE_MAPS = ("config.json", "tokenizer_config.json")


def model_dir_problem(path: str) -> str | None:
    """Why ``path`` is not a Hugging Face model directory minerd may load, or None when it is one.

    A directory that brings its own Python code is refused: transformers would ask on the
    terminal whether to run it (and a ``y`` would), so minerd never lets it get that far,
    and loads with ``trust_remote_code=False`` as well."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return "not a directory"
    if not (p / "config.json").is_file():
        return "not a Hugging Face model directory (no config.json)"
    if not any((p / name).is_file() for name in MODEL_WEIGHTS):
        return "has no weights (model.safetensors or pytorch_model.bin)"
    code = sorted(f.name for f in p.iterdir() if f.suffix == ".py")
    if code:
        return f"holds Python code ({code[0]}); a model's own code is never run"
    for name in CODE_MAPS:
        if not (p / name).exists():
            continue
        config = read_json(p / name)
        if isinstance(config, str):
            return f"{name} {config}"
        if not isinstance(config, dict):
            return f"{name} is not a JSON object"
        if "auto_map" in config:
            return f"{name} names the model's own Python code (auto_map); it is never run"
    return None


def read_json(path: Path) -> Any:
    """The parsed file, or why not ("is not readable JSON (...)"). Bounded before it is read
    (a regular file of at most MAX_CONFIG_BYTES: the operator's directory may link its files
    into a cache, as the Hugging Face hub's does, but not to a device); json's own recursion
    limit on a deeply nested file is a finding too, not a traceback."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CONFIG_BYTES:
            return f"is not a regular file of at most {MAX_CONFIG_BYTES} bytes"
        with open(path, "rb") as fh:
            return json.loads(fh.read(MAX_CONFIG_BYTES + 1))
    except RecursionError:
        return "is not readable JSON (nested too deep)"
    except (OSError, ValueError) as exc:
        return f"is not readable JSON ({exc})"
