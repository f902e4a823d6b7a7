"""What the two-tower task asks of the pairs source (plain data: config validation reads it
without importing a model library)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PairsSpec:
    corpus: str  # "code" or "pairs"
    entries: tuple[str, ...]  # twotower.pairs
    vocab_size: int
    eval_fraction: float
    eval_queries: int  # at most this many held-out queries are evaluated
    init_from: str = ""  # a model directory whose tokenizer numbers the tokens ("" = a BPE of vocab_size)
    code_paths: tuple[str, ...] = ()  # the code corpus's directories ("" = this interpreter's sources)
