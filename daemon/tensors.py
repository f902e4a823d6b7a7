"""Tied weights in state dicts.

A language model whose output layer shares the input embedding has two keys for
one tensor. safetensors refuses to store shared tensors, and copying both would
double the largest matrix of the model; so files hold each tensor once and an
alias map names the keys that point at another.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def aliases(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Keys whose tensor is the same memory as an earlier key's, mapped to that key."""
    first: dict[tuple[object, ...], str] = {}
    out: dict[str, str] = {}
    for key, t in tensors.items():
        ident = (t.device, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in first:
            out[key] = first[ident]
        else:
            first.setdefault(ident, key)
    return out


def without_aliases(tensors: Mapping[str, torch.Tensor], alias: Mapping[str, str]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k not in alias}


def with_aliases(tensors: Mapping[str, torch.Tensor], alias: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The full state dict again: each alias key points at its original's tensor."""
    out = dict(tensors)
    for key, original in alias.items():
        out[key] = out[original]
    return out
