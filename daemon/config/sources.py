"""Where the config comes from: the YAML file, ``MINERD_*`` variables, ``--set``.

Values from the environment and ``--set`` stay raw text until the key they set is
known: a string or secret key takes the text exactly as given (a token may hold
``#``, ``&``, ``~`` or only digits, which YAML would turn into a comment, an anchor,
null or a number); any other key reads it as a YAML scalar, so ``5`` is an int and
``[a, b]`` a list. The file must be a regular file of at most 1 MiB, and YAML
aliases are refused: a few hundred bytes of nested aliases expand to gigabytes.
"""

from __future__ import annotations

import os
import stat
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import yaml
from pydantic import BaseModel, SecretStr

from daemon.config.errors import ConfigError, problem

ENV_PREFIX = "MINERD_"
MAX_FILE_BYTES = 1 << 20


class Raw(str):
    """Text from the environment or ``--set``, not yet read as a value."""


class _NoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a minerd config", event.start_mark
            )
        return super().compose_node(parent, index)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_NoAliasLoader)


def _yaml_problem(where: str, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    at = f"{where}:{mark.line + 1}" if mark is not None else where
    what = getattr(exc, "problem", None) or "malformed YAML"
    return f"config error: {at}: malformed YAML: {what}"


def read_file(path: str) -> dict[str, Any]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError([problem("--config", "file not found", path)]) from None
    except OSError as exc:
        raise ConfigError([problem("--config", f"cannot read file: {exc.strerror or exc}", path)]) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError([problem("--config", "not a regular file", path)])
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise ConfigError([problem("--config", f"larger than {MAX_FILE_BYTES} bytes", path)])
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError([problem("--config", f"cannot read file: {reason}", path)]) from None
    try:
        tree = parse_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(path, exc)]) from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError([problem("--config", "the file must hold a mapping of sections", path)])
    return tree


def set_path(tree: dict[str, Any], dotted: str, value: Any, origin: str, problems: list[str]) -> None:
    parts = [p for p in dotted.split(".") if p]
    if len(parts) < 2:
        problems.append(problem(dotted or origin, f"{origin} needs section.key=value", value))
        return
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            problems.append(problem(dotted, "is not a section", child))
            return
        node = child
    node[parts[-1]] = value


def from_env(environ: Mapping[str, str], problems: list[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        set_path(tree, dotted, Raw(raw), name, problems)
    return tree


def from_sets(sets: Iterable[str], problems: list[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            problems.append(problem("--set", "expected section.key=value", key))
            continue
        set_path(tree, key.strip(), Raw(raw), "--set", problems)
    return tree


def _takes_text(annotation: Any) -> bool:
    """A key whose value is text as given: str, a secret, or a choice among strings."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = [a for a in (typing.get_args(annotation) if union else (annotation,)) if a is not type(None)]

    def text(kind: Any) -> bool:
        if typing.get_origin(kind) is Literal:
            return all(isinstance(choice, str) for choice in typing.get_args(kind))
        return kind in (str, SecretStr)

    return bool(kinds) and all(text(k) for k in kinds)


def _value(raw: Raw) -> Any:
    try:
        return parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return str(raw)


def resolve(tree: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """Each raw value read for the key it sets (see the module docstring)."""
    out: dict[str, Any] = {}
    fields = model.model_fields
    for key, value in tree.items():
        field = fields.get(key)
        sub = field.annotation if field is not None else None
        if isinstance(value, dict):
            nested = isinstance(sub, type) and issubclass(sub, BaseModel)
            out[key] = resolve(value, sub) if nested else value  # type: ignore[arg-type]
        elif isinstance(value, Raw):
            out[key] = str(value) if sub is not None and _takes_text(sub) else _value(value)
        else:
            out[key] = value
    return out
