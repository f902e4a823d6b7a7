"""Nested training state as safetensors plus JSON: a checkpoint that cannot run code.

Optimizer state dicts, counters, RNG states and the like are trees of dicts, lists,
tuples, numbers, strings and tensors. A pickle of them runs code when it is read, and
a state directory can be written by others (a shared disk, a copied backup). So the
tree is split: every tensor goes into one safetensors file under a generated name,
the rest into a JSON skeleton that names them. Dict keys keep their type (optimizer
states key their parameters by int) and tuples stay tuples.

A :class:`~daemon.rowtable.RowTable` is written in full, or, when the caller names a
base (an earlier checkpoint holding it in full, from the same lineage), as the rows
changed since that base plus a reference to the base's tensors; reading it back
takes a function that fetches the base's tensors and always gives full tensors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from daemon.disk import save_safetensors
from daemon.rowtable import RowTable

FORMAT = 1


@dataclass(frozen=True)
class RowBase:
    """A row table written in full: which checkpoint, at which version, under which keys, and
    the sha256 of that checkpoint's tensor file (a delta names it: a base of the same name from
    another history, a machine's copied-in checkpoint, is then told apart and refused)."""

    checkpoint: str
    lineage: str
    version: int
    keys: dict[str, str]
    digest: str = ""


# Given where a row table sits in the tree and the table, the base to write it against (or None: in full).
ChooseBase = Callable[[str, RowTable], "RowBase | None"]
# Fetches tensor ``key`` of checkpoint ``name``'s training state, whose tensor file must have
# sha256 ``digest`` (else ValueError: the delta was not written against this base).
BaseTensor = Callable[[str, str, str], torch.Tensor]


def pack(
    tree: Any, choose_base: ChooseBase | None = None, written: dict[str, RowBase] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, skeleton) of ``tree``; TypeError names anything that is neither.

    Row tables written in full are reported in ``written`` (by where they sit, with an
    empty checkpoint name: the caller knows it), so they can serve as later bases.
    """
    tensors: dict[str, torch.Tensor] = {}

    def put(t: torch.Tensor) -> str:
        key = f"t{len(tensors)}"
        # A copy of its own: safetensors refuses tensors that share memory.
        tensors[key] = t.detach().cpu().clone().contiguous()
        return key

    def enc_rows(x: RowTable, where: str) -> Any:
        base = choose_base(where, x) if choose_base is not None else None
        if base is None or set(base.keys) != set(x.tensors):
            keys = {name: put(t) for name, t in x.tensors.items()}
            if written is not None:
                written[where] = RowBase("", x.lineage, x.version, keys)
            return {"__rows__": {"tensors": keys}}
        ids = x.changed_since(base.version)
        return {"__rows__": {
            "ids": put(ids),
            "tensors": {name: put(t.index_select(0, ids.to(t.device))) for name, t in x.tensors.items()},
            "base": {"checkpoint": base.checkpoint, "keys": base.keys, "digest": base.digest},
        }}

    def enc(x: Any, where: str) -> Any:
        if isinstance(x, RowTable):
            return enc_rows(x, where)
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if isinstance(x, torch.Tensor):
            return {"__tensor__": put(x)}
        if isinstance(x, np.generic):
            x = x.item()
        if x is None or isinstance(x, bool | int | str):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"__float__": repr(x)}
        if isinstance(x, dict):
            for k in x:
                if not isinstance(k, str | int) or isinstance(k, bool):
                    raise TypeError(f"{where}: a dict key of type {type(k).__name__}")
            return {"__dict__": [[k, enc(v, f"{where}.{k}")] for k, v in x.items()]}
        if isinstance(x, list):
            return [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]}
        raise TypeError(f"{where}: cannot store a {type(x).__name__} in a checkpoint")

    return tensors, {"format": FORMAT, "tree": enc(tree, "state")}


def unpack(tensors: dict[str, torch.Tensor], skeleton: dict[str, Any], base_tensor: BaseTensor | None = None) -> Any:
    """The tree again; ValueError when the skeleton is not one ``pack`` wrote, or a row
    table's changed rows do not fit its base."""
    if not isinstance(skeleton, dict) or skeleton.get("format") != FORMAT:
        raise ValueError("not a training-state skeleton of a known format")

    def dec_rows(x: dict[str, Any]) -> RowTable:
        own = {name: tensors[key] for name, key in x["tensors"].items()}
        if "base" not in x:
            return RowTable(own)
        if base_tensor is None:
            raise ValueError("a row table refers to a base checkpoint, and none can be read here")
        base, ids = x["base"], tensors[x["ids"]]
        if set(base["keys"]) != set(own) or ids.dtype != torch.int64 or ids.dim() != 1:
            raise ValueError("a row table's changed rows do not match its base")
        full = {}
        for name, rows in own.items():
            t = base_tensor(str(base["checkpoint"]), str(base["keys"][name]), str(base.get("digest", ""))).to(
                rows.device)
            if t.dtype != rows.dtype or t.shape[1:] != rows.shape[1:] or len(rows) != len(ids) or (
                    len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= len(t))):
                raise ValueError(f"the changed rows of {name!r} do not fit its base")
            t[ids.to(t.device)] = rows
            full[name] = t
        return RowTable(full)

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__rows__" in x:
            return dec_rows(x["__rows__"])
        if "__tensor__" in x:
            return tensors[x["__tensor__"]]  # KeyError: a skeleton naming a missing tensor
        if "__float__" in x:
            return float(x["__float__"])
        if "__tuple__" in x:
            return tuple(dec(v) for v in x["__tuple__"])
        if "__dict__" in x:
            return {k: dec(v) for k, v in x["__dict__"]}
        raise ValueError(f"unexpected node in a training-state skeleton: {sorted(x)[:3]}")

    return dec(skeleton["tree"])


def save(
    tree: Any, tensors_path: Path, skeleton_path: Path,
    choose_base: ChooseBase | None = None, written: dict[str, RowBase] | None = None,
) -> None:
    """Write both files (the caller fsyncs and renames them into place)."""
    tensors, skeleton = pack(tree, choose_base, written)
    save_safetensors(tensors, tensors_path)
    skeleton_path.write_text(json.dumps(skeleton, separators=(",", ":")))


def load(
    tensors_path: Path, skeleton_path: Path, device: str | torch.device = "cpu", base_tensor: BaseTensor | None = None
) -> Any:
    return unpack(load_file(str(tensors_path), device=str(device)), json.loads(skeleton_path.read_text()), base_tensor)
