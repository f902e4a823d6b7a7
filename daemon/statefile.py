"""Nested training state as safetensors plus JSON: a checkpoint that cannot run code.

Optimizer state dicts, counters, RNG states and the like are trees of dicts, lists,
tuples, numbers, strings and tensors. A pickle of them runs code when it is read, and
a state directory can be written by others (a shared disk, a copied backup). So the
tree is split: every tensor goes into one safetensors file under a generated name,
the rest into a JSON skeleton that names them. Dict keys keep their type (optimizer
states key their parameters by int) and tuples stay tuples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from daemon.disk import save_safetensors

FORMAT = 1


def pack(tree: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, skeleton) of ``tree``; TypeError names anything that is neither."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, where: str) -> Any:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            # A copy of its own: safetensors refuses tensors that share memory.
            tensors[key] = x.detach().cpu().clone().contiguous()
            return {"__tensor__": key}
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


def unpack(tensors: dict[str, torch.Tensor], skeleton: dict[str, Any]) -> Any:
    """The tree again; ValueError when the skeleton is not one ``pack`` wrote."""
    if not isinstance(skeleton, dict) or skeleton.get("format") != FORMAT:
        raise ValueError("not a training-state skeleton of a known format")

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
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


def save(tree: Any, tensors_path: Path, skeleton_path: Path) -> None:
    """Write both files (the caller fsyncs and renames them into place)."""
    tensors, skeleton = pack(tree)
    save_safetensors(tensors, tensors_path)
    skeleton_path.write_text(json.dumps(skeleton, separators=(",", ":")))


def load(tensors_path: Path, skeleton_path: Path, device: str | torch.device = "cpu") -> Any:
    return unpack(load_file(str(tensors_path), device=str(device)), json.loads(skeleton_path.read_text()))
