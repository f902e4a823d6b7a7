"""``twotower.init_from`` checked without loading a model library: the directory is one
minerd may load (no code of its own, bounded config files), it has a tokenizer, and that
tokenizer's ids all have a row in the model's input embedding."""

from __future__ import annotations

import daemon.data.text.vocab as vocab
from daemon.config import problem
from daemon.model_dir import model_dir_problem

KEY = "twotower.init_from"


def init_from_problems(path: str) -> list[str]:
    if why := model_dir_problem(path):
        return [problem(KEY, why, path)]
    if why := vocab.named_problem(path):
        return [problem(KEY, why, path)]
    try:
        ids = vocab.file_ids(path)
    except ValueError as exc:
        return [problem(KEY, f"cannot load a tokenizer from it: {str(exc)[:200]}", path)]
    rows = vocab.model_rows(path)
    why = None if ids is None or rows is None else vocab.ids_problem(
        ids[0], rows, f"the vocab_size of {KEY}'s config.json")
    return [problem(KEY, why, path)] if why else []
