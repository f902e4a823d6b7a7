"""What a validator does with a pseudo-gradient artifact: check it fits the model and decodes.

Run by ``minerd verify-upload`` on a revision whose files matched their manifest, in the
folder they were verified into. What the artifact may decode to is bounded by the model's
shapes, taken from:

- the weights' safetensors header (or their shards' headers) when the weights are in the
  revision: the real shapes, backed by the weights' own bytes (the uploader's shape files
  are not asked);
- else ``config.json`` (a Hugging Face model built on the meta device: shapes without
  memory) or ``model_shapes.json``, which the uploader wrote: then the model they describe
  may have at most ``Limits.params`` parameters in all.

The artifact's header is checked against those shapes before any tensor is read, and the
tensors are read one parameter at a time (``daemon/compression/artifact.py``), from one file
or from the shards its index names (which ``verify.py`` checked as it checks the weights').
"""

from __future__ import annotations

import math
from typing import Any

from safetensors import SafetensorError

from daemon import tensor_files
from daemon.compression import artifact
from daemon.storage import MANIFEST
from daemon.upload.layout import MODEL_FILE, MODEL_STEM, SHAPES_FILE
from daemon.upload.limits import LIMITS, Limits, Refused, first_line, read_json
from daemon.upload.model_size import HF_CONFIG, model_size, read_config
from daemon.upload.verify import Revision, stored_tensors, tensor_shapes

Shapes = dict[str, list[int]]


def check_artifact(rev: Revision, limits: Limits = LIMITS) -> list[str]:
    """Problems with the pseudo-gradient of a verified revision; empty without one."""
    files = rev.files
    stored = tensor_files.stored(files, artifact.TENSORS_STEM)
    has_header, has_tensors = artifact.HEADER_FILE in files, bool(stored)
    if not has_header and not has_tensors:
        return []
    if has_header != has_tensors:
        return [f"{rev.where}: lists only one of {artifact.HEADER_FILE} and {artifact.TENSORS_FILE} (or its shards)"]
    expected, complete, why = model_shapes(rev, limits)
    if why:
        return [f"{rev.where}/{why}"]
    try:
        header = read_json(rev.folder / artifact.HEADER_FILE, limits.description_bytes, limits.json_depth)
    except Refused as exc:
        return [f"{rev.where}/{artifact.HEADER_FILE}: {exc}"]
    # Findings are about the tensors, wherever they are stored: the file, or the index of the shards.
    named = artifact.TENSORS_FILE if stored == [artifact.TENSORS_FILE] else artifact.TENSORS_INDEX
    where = f"{rev.where}/{named}"
    try:
        tensors = artifact.TensorFile(*(rev.folder / name for name in stored))
        return [f"{where}: {p}" for p in artifact.problems(header, tensors, expected, complete)]
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        return [f"{where}: unreadable: {first_line(exc)}"]


def model_shapes(rev: Revision, limits: Limits = LIMITS) -> tuple[Shapes | None, bool, str | None]:
    """(parameter name -> shape, whether every one must be in the artifact, a problem: "<file>: why")."""
    files = rev.files
    header = stored_tensors(rev.folder, files, MODEL_STEM, limits)
    if isinstance(header, str):
        return None, False, header
    if header is not None:
        return tensor_shapes(header), False, None
    if HF_CONFIG in files:
        config = read_config(rev.folder, limits)
        if isinstance(config, str):
            return None, False, f"{HF_CONFIG}: {config}"
        size = model_size(rev.folder)
        if isinstance(size, str):
            return None, False, f"{HF_CONFIG}: {size}"
        return _bounded(size.params, HF_CONFIG, limits)
    if SHAPES_FILE in files:
        try:
            shapes = read_json(rev.folder / SHAPES_FILE, limits.description_bytes, limits.json_depth)
        except Refused as exc:
            return None, False, f"{SHAPES_FILE}: {exc}"
        if not _is_shapes(shapes):
            return None, False, f"{SHAPES_FILE}: not a mapping of names to shapes"
        return _bounded(shapes, SHAPES_FILE, limits)
    return None, False, f"{MANIFEST}: lists nothing to check the pseudo-gradient's shapes against " \
        f"({MODEL_FILE}, {HF_CONFIG} or {SHAPES_FILE})"


def _is_shapes(shapes: Any) -> bool:
    return isinstance(shapes, dict) and all(
        isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v)
        for v in shapes.values())


def _bounded(shapes: Shapes, source: str, limits: Limits) -> tuple[Shapes | None, bool, str | None]:
    """Shapes the uploader described: what the artifact decodes to is at most their total,
    and that total at most ``limits.params``."""
    total = sum(math.prod(shape) for shape in shapes.values())
    if total > limits.params:
        return None, False, f"{source}: describes {total:,} parameters, over the {limits.params:,} a revision " \
            "without its weights may describe"
    return shapes, True, None
