"""Model weights in and out of exchange folders: the task's revision layout (a Hugging Face
folder for the language model) and the outer optimizer's momentum, as safetensors only."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from daemon.disk import save_safetensors
from daemon.storage import Storage
from daemon.sync.exchange.layout import (
    MAX_JSON_BYTES,
    OUTER_FILE,
    ROUND_FILE,
    Refused,
    RoundInfo,
    fetch,
    global_folder,
    loads,
)
from daemon.tensors import aliases
from daemon.upload.layout import MODEL_FILE, RevisionLayout

OTHER_FILE_BYTES = 64 << 20  # a config or tokenizer file of a global revision


def named_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def shapes(model: nn.Module) -> dict[str, list[int]]:
    return {name: list(p.shape) for name, p in model.named_parameters()}


def weights_bytes(model: nn.Module) -> int:
    """The most a weights file of this model may hold: its float32 state plus room for the header."""
    return sum(t.numel() * 4 for t in model.state_dict().values()) + (1 << 20)


def write_model(model: nn.Module, layout: RevisionLayout, folder: Path) -> list[str]:
    state = model.state_dict()
    tied = aliases(state)  # before any copy: copies no longer share memory
    return layout.write({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()
                         if k not in tied}, folder)


def write_momentum(buffers: dict[str, torch.Tensor], path: Path) -> None:
    save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in buffers.items()}, path, {"format": "pt"})


def read_tensors(path: Path, expected: dict[str, list[int]], where: str, complete: bool = True
                 ) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose names and shapes are among ``expected`` (all of
    them with ``complete``); Refused otherwise. Shapes are checked from the header before any
    tensor is read."""
    out = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            names = list(fh.keys())
            stray = [n for n in names if n not in expected]
            if stray:
                raise Refused(f"{where}: holds {len(stray)} tensor(s) the model does not have, e.g. {stray[0][:80]!r}")
            if complete and (missing := sorted(set(expected) - set(names))):
                raise Refused(f"{where}: lacks {len(missing)} of the model's tensors, e.g. {missing[0][:80]!r}")
            for name in names:
                if list(fh.get_slice(name).get_shape()) != expected[name]:
                    raise Refused(f"{where}: tensor {name[:80]!r} is not of shape {expected[name]}")
            for name in names:
                t = fh.get_tensor(name)
                if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                    raise Refused(f"{where}: tensor {name[:80]!r} is not finite floating point")
                out[name] = t.float()
    except SafetensorError as exc:
        raise Refused(f"{where}: not a safetensors file ({str(exc)[:80]})") from None
    return out


def load_model(model: nn.Module, files: dict[str, Path], where: str) -> None:
    """Weights of a fetched global revision into ``model`` (tied weights come with their source)."""
    state = model.state_dict()
    tied = aliases(state)
    expected = {k: list(v.shape) for k, v in state.items() if k not in tied}
    loaded = read_tensors(files[MODEL_FILE], expected, f"{where}/{MODEL_FILE}")
    with torch.no_grad():
        for name, value in loaded.items():
            state[name].copy_(value.to(state[name].dtype))


def load_global(storage: Storage, round_: int, model: nn.Module, applicability: str
                ) -> tuple[RoundInfo, dict[str, torch.Tensor]]:
    """Global revision ``round_`` into ``model``: fetched and checked against its manifest, its
    ``round.json`` naming this round and this model, tokenizer and dataset; returns the round
    record and the outer momentum it carries. Refused (the model untouched) otherwise."""
    folder = global_folder(round_)
    caps = {MODEL_FILE: weights_bytes(model), OUTER_FILE: weights_bytes(model), ROUND_FILE: MAX_JSON_BYTES,
            "*": OTHER_FILE_BYTES}
    with tempfile.TemporaryDirectory(prefix="minerd-global-") as tmp:
        files = fetch(storage, folder, Path(tmp), caps)
        if not {ROUND_FILE, MODEL_FILE, OUTER_FILE} <= set(files):
            raise Refused(f"{folder}: lacks {ROUND_FILE}, {MODEL_FILE} or {OUTER_FILE}")
        where = f"{folder}/{ROUND_FILE}"
        info = RoundInfo.parse(loads(files[ROUND_FILE].read_bytes(), where), where)
        if info.round != round_:
            raise Refused(f"{where}: says round {info.round}")
        if info.applicability != applicability:
            raise Refused(f"{folder}: made for another model, tokenizer or dataset (applicability "
                          f"{info.applicability[:16]}, this config's {applicability[:16]})")
        momentum = read_tensors(files[OUTER_FILE], shapes(model), f"{folder}/{OUTER_FILE}")
        load_model(model, files, folder)
    return info, momentum
