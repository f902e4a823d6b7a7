"""What a check of a published revision accepts: bytes per file, JSON nesting, model size.

Every byte of an upload is treated as hostile (``minerd verify-upload`` runs on miners' own
targets, an aggregator on other miners' submissions): each read is bounded before it
happens, so that a file that lies about its size, a pointer to a device, or a deeply nested
JSON document costs a bounded amount of memory and time and ends in one line.

The defaults fit what minerd publishes with room to spare; a caller checking larger models
passes its own ``Limits``.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20

# "rev-<outer>-<inner>\n" is a few dozen bytes.
MAX_POINTER_BYTES = 256
# A manifest names a dozen files at about 150 bytes each.
MAX_MANIFEST_BYTES = 1 * MiB
# config.json and generation_config.json are a few KB; even long id2label maps stay far below.
MAX_CONFIG_BYTES = 1 * MiB
# The pseudo-gradient's JSON header and model_shapes.json: a line per parameter.
MAX_DESCRIPTION_BYTES = 16 * MiB
# Tokenizer files: tokenizer.json is 9 MB for Llama 3's 128k vocabulary, 33 MB for Gemma 3's.
MAX_AUX_BYTES = 64 * MiB
# Weights, optimizer state and the pseudo-gradient's tensors, one file each: llama-8b is 32 GB
# of float32 weights (in shards of upload.shard_bytes, 5 GB by default) and 64 GB of Adam
# state, which is one file.
MAX_TENSOR_FILE_BYTES = 80 << 30
# All files of one revision together (downloaded into a temporary directory to be checked):
# llama-8b's weights, Adam state and pseudo-gradient come to 97 GB.
MAX_REVISION_BYTES = 128 << 30
# A revision holds a dozen files; llama-8b's weights in 5 GB shards are seven of them.
MAX_FILES = 64
# A safetensors header lists each tensor in about 100 bytes: a few MB for the largest models
# (the safetensors library itself allows 100 MB, which Python's json would turn into GBs).
# The headers of one model's shards together take no more than one header may.
MAX_SAFETENSORS_HEADER = 16 * MiB
# model.safetensors.index.json maps each tensor to its shard in about 80 bytes: 24 KB for
# llama-8b's 291 tensors. Parsed, 4 MB of JSON take tens of MB of Python objects at most.
MAX_INDEX_BYTES = 4 * MiB
# Manifests, configs and headers nest three or four levels deep.
MAX_JSON_DEPTH = 32
# Llama 3.1 405B has 126 layers: building a model of a config on the meta device costs
# about 55 KB and 2 ms a layer, so a config asking for 20,000 layers is refused unbuilt.
MAX_LAYERS = 256
# Mixture-of-experts configs build a module per expert and layer: the same reason.
MAX_EXPERTS = 512
# The total parameters a revision without weights may describe (model_shapes.json or
# config.json alone): twice the largest preset a single GPU trains (llama-1b, 990M parameters
# at a vocabulary of 8192), which leaves room for Llama-3.2-1B's 1.24B. A pseudo-gradient
# decodes to at most this many float32 values (8 GB), which is why the sharded presets'
# pseudo-gradients (llama-3b, llama-8b) are checked with --max-params raised on a machine
# with the memory for them. A revision with its weights is bounded by the weights' own bytes.
MAX_PARAMS = 2_000_000_000


@dataclass(frozen=True)
class Limits:
    pointer_bytes: int = MAX_POINTER_BYTES
    manifest_bytes: int = MAX_MANIFEST_BYTES
    config_bytes: int = MAX_CONFIG_BYTES
    description_bytes: int = MAX_DESCRIPTION_BYTES
    aux_bytes: int = MAX_AUX_BYTES
    tensor_file_bytes: int = MAX_TENSOR_FILE_BYTES
    revision_bytes: int = MAX_REVISION_BYTES
    files: int = MAX_FILES
    safetensors_header: int = MAX_SAFETENSORS_HEADER
    index_bytes: int = MAX_INDEX_BYTES
    json_depth: int = MAX_JSON_DEPTH
    layers: int = MAX_LAYERS
    experts: int = MAX_EXPERTS
    params: int = MAX_PARAMS

    def file_bytes(self, name: str) -> int:
        """The most bytes a revision's file of this name may hold."""
        if name in ("config.json", "generation_config.json"):
            return self.config_bytes
        if name in ("pseudo_gradient.json", "model_shapes.json"):
            return self.description_bytes
        if name.endswith(".safetensors.index.json"):
            return self.index_bytes
        if name.endswith((".safetensors", ".pt", ".bin")):
            return self.tensor_file_bytes
        return self.aux_bytes


LIMITS = Limits()


class Refused(ValueError):
    """Input refused before or while parsing it; the message is the one line to show."""


def first_line(exc: BaseException) -> str:
    """An exception as one short line: a library's message may span pages."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def load_json(raw: bytes, depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON whose size the caller has bounded, nested at most ``depth`` levels.

    Python's json recurses once per level: a few hundred KB of ``[[[[...`` raise
    RecursionError (a RuntimeError, which no caller expects) and a document just under the
    interpreter's recursion limit parses, only to break whatever walks it next. So the
    parser's own limit is caught here, and what parses is measured without recursion and
    refused above ``depth``, far below the interpreter's limit wherever the caller runs.
    """
    try:
        data = json.loads(raw)
    except RecursionError:
        raise Refused(f"nested deeper than {depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refused(f"not valid JSON: {str(exc)[:200]}") from None
    if _depth(data) > depth:
        raise Refused(f"nested deeper than {depth} levels")
    return data


def _depth(data: Any) -> int:
    deepest, todo = 0, [(data, 1)]
    while todo:
        node, level = todo.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level)
            todo.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def read_file(path: Path, cap: int) -> bytes:
    """The bytes of a regular file of at most ``cap`` bytes, never following a symbolic link
    and never opening a device or a pipe (whose reads never end or block); Refused otherwise."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):  # before opening: opening a device can act on it
            raise Refused("not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise Refused(f"unreadable: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced between the two looks
            raise Refused("not a regular file")
        if st.st_size > cap:
            raise Refused(f"{st.st_size} bytes, over the {cap} it may take")
        data = fh.read(cap + 1)
    if len(data) > cap:  # grew since the stat
        raise Refused(f"over the {cap} bytes it may take")
    return data


def read_json(path: Path, cap: int, depth: int = MAX_JSON_DEPTH) -> Any:
    return load_json(read_file(path, cap), depth)
