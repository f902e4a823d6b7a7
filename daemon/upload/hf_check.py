"""What a validator does with a Hugging Face revision: load it offline, run it once.

A revision whose manifest lists ``config.json`` and ``model.safetensors`` (or its shards and
``model.safetensors.index.json``) is in the Hugging Face layout. It is checked in the folder
its files were verified into (``verify.py``, which checked the index too), so what loads is
what was hashed. Before anything is allocated, the parameters the config describes (counted
on the meta device, ``model_size.py``) must be exactly those the weights' headers hold,
summed over the shards: ``from_pretrained`` then allocates no more than the weights' own
bytes. Then ``AutoTokenizer.from_pretrained`` and ``AutoModelForCausalLM.from_pretrained``
load it with no network and no code of the upload's (``trust_remote_code=False``), and a
forward pass over a fixed text must give a finite loss.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path
from typing import cast

from daemon.upload.layout import MODEL_FILE, MODEL_INDEX_FILE, MODEL_STEM
from daemon.upload.limits import LIMITS, Limits, first_line
from daemon.upload.model_size import HF_CONFIG, model_size, read_config
from daemon.upload.verify import Revision, stored_tensors, tensor_elements

# Code and prose, as the default corpus holds: any tokenizer gives it a few dozen tokens.
PROBE_TEXT = (
    'def add(a, b):\n    """Return the sum of a and b."""\n    return a + b\n\n'
    "The quick brown fox jumps over the lazy dog.\n"
)


def check_loadable(rev: Revision, limits: Limits = LIMITS) -> list[str]:
    """Problems loading a verified revision as a validator would; empty when it loads and runs
    (or is not in the Hugging Face layout: the artifact's check covers a revision without weights)."""
    files = rev.files
    if HF_CONFIG not in files or (MODEL_FILE not in files and MODEL_INDEX_FILE not in files):
        return []
    why = size_problem(rev.folder, files, limits)
    if why:
        return [f"{rev.where}/{why}"]
    return _load_and_run(rev.folder, rev.where)


def size_problem(folder: Path, listed: Collection[str], limits: Limits = LIMITS) -> str | None:
    """Why the model of ``folder``'s config.json does not match its weights (``listed``: the
    manifest's files), as "<file>: why", or None when the config builds a model of exactly the
    weights' parameter count."""
    config = read_config(folder, limits)
    if isinstance(config, str):
        return f"{HF_CONFIG}: {config}"
    header = stored_tensors(folder, listed, MODEL_STEM, limits)
    if header is None:
        return f"{HF_CONFIG}: beside no weights"
    if isinstance(header, str):
        return header
    size = model_size(folder)
    if isinstance(size, str):
        return f"{HF_CONFIG}: {size}"
    held = tensor_elements(header)
    if held not in (size.param_elements, size.param_elements + size.buffer_elements):
        holder = f"{MODEL_FILE} holds" if MODEL_FILE in listed else f"the shards {MODEL_INDEX_FILE} names hold"
        return f"{HF_CONFIG}: describes a model of {size.param_elements:,} parameters, {holder} {held:,}"
    return None


def _load_and_run(folder: Path, where: str) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a check's output is its one line, not a loading bar on stderr

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # any failure to load is the finding, whatever the library raises
        return [f"{where}: AutoTokenizer.from_pretrained fails: {first_line(exc)}"]
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False, dtype=torch.float32)
    except Exception as exc:
        return [f"{where}: AutoModelForCausalLM.from_pretrained fails: {first_line(exc)}"]
    ids = tok(PROBE_TEXT, return_tensors="pt").input_ids
    if ids.shape[1] < 2:
        return [f"{where}: the tokenizer turns the probe text into {ids.shape[1]} token(s)"]
    if int(ids.max()) >= int(cast(torch.nn.Embedding, model.get_input_embeddings()).num_embeddings):
        return [f"{where}: the tokenizer yields ids beyond the model's vocabulary"]
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    if not math.isfinite(loss):
        return [f"{where}: the forward pass on a fixed text gives a non-finite loss ({loss})"]
    return []
