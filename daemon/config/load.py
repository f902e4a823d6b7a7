"""Resolving the sources into a validated Config, or every problem as one line.

Sources, later wins: the YAML file < ``MINERD_<SECTION>__<KEY>`` environment
variables < ``--set section.key=value`` (``sources.py``). A key that moved is read
at its new place, with one deprecation line; unknown keys get a did-you-mean; then
the chosen parts' defaults fill the keys no source set; then each section validates
its keys; then the rules that span sections, and the registered parts' own.

The loader knows no task or outer sync: the composition root hands it a
:class:`Schema` (the whole tree's model, the moved keys, the parts' defaults and
checks). Nothing here touches the state directory, so a bad config never leaves
anything behind.
"""

from __future__ import annotations

import difflib
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from daemon.config.errors import ConfigError, problem
from daemon.config.secrets import is_secret_key
from daemon.config.section import CrossFieldError
from daemon.config.sections import Config
from daemon.config.sources import from_env, from_sets, read_file, resolve, set_path


class Schema(Protocol):
    """What the loader needs to know of the registered parts (tasks, outer syncs, data sources)."""

    @property
    def model(self) -> type[Config]:
        """The whole tree: the core sections and every registered part's."""

    @property
    def renamed(self) -> Mapping[str, str]:
        """Old dotted keys and their new place, read for one release with a deprecation line."""

    def defaults(self, tree: Mapping[str, Any]) -> Mapping[str, Any]:
        """Dotted keys the parts chosen by ``tree`` set when no source set them."""

    def problems(self, cfg: Config, world_size: int) -> list[str]:
        """The chosen parts' checks, and the rules between parts, as config error lines."""


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _unknown_keys(tree: Mapping[str, Any], model: type[BaseModel], prefix: str) -> list[str]:
    """Unknown keys with a did-you-mean, found before pydantic so the hint is ours."""
    problems = []
    fields = model.model_fields
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            # A mistyped secret key (api.tokn) holds a secret all the same.
            secret = bool(close) and is_secret_key(f"{prefix}{close[0]}")
            problems.append(problem(path, f"unknown key{hint}", value, secret=secret))
            continue
        sub = fields[key].annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            if isinstance(value, Mapping):
                problems.extend(_unknown_keys(value, sub, f"{path}."))
            else:
                problems.append(problem(path, "must be a mapping of keys", value))
    return problems


def _lookup(tree: Mapping[str, Any], loc: tuple[Any, ...]) -> Any:
    node: Any = tree
    for part in loc:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            return None
    return node


def _validation_lines(exc: ValidationError, tree: Mapping[str, Any]) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if isinstance(p, str | int))
        ctx = err.get("ctx") or {}
        cross = ctx.get("error")
        if isinstance(cross, CrossFieldError):
            path = ".".join(str(p) for p in loc) + f".{cross.key}"
            lines.append(problem(path, cross.message, cross.value))
            continue
        path = ".".join(str(p) for p in loc)
        msg = err["msg"].removeprefix("Value error, ")  # a validator's own message reads as the others do
        msg = msg[0].lower() + msg[1:]
        lines.append(problem(path, msg, _lookup(tree, loc) if loc else err.get("input")))
    return lines


def world_size_from_env(environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    try:
        return max(1, int(env.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def semantic_problems(cfg: Config, world_size: int, schema: Schema) -> list[str]:
    """Rules that span the core's sections or depend on the launch (world size), then the
    registered parts' own."""
    problems = []
    t = cfg.train
    per_step = t.batch_size * world_size
    if t.effective_batch_size % per_step != 0:
        problems.append(
            problem(
                "train.effective_batch_size",
                f"must be a multiple of train.batch_size x world size "
                f"({t.batch_size} x {world_size} = {per_step})",
                t.effective_batch_size,
            )
        )
    if t.device not in ("auto", "cpu", "cuda") and not t.device.startswith("cuda:"):
        problems.append(problem("train.device", "must be auto, cpu, cuda or cuda:N", t.device))
    state_dir_problem = _state_dir_problem(cfg.state_dir)
    if state_dir_problem:
        problems.append(problem("paths.state_dir", state_dir_problem, cfg.paths.state_dir))
    up = cfg.upload
    if up.enabled and up.backend == "s3" and not up.target.startswith("s3://"):
        problems.append(problem("upload.target", "must be s3://bucket/prefix with upload.backend=s3", up.target))
    if up.enabled and up.backend == "local" and "://" in up.target:
        # The local backend would have made a folder named "s3:" in the working directory.
        problems.append(problem("upload.target", "is a URL: set upload.backend=s3 for it, or give a directory",
                                up.target))
    if t.outer_compression != "none" and t.sync != "diloco":
        # Under DDP gradients are averaged every inner step: there is no outer sync to compress.
        problems.append(problem("train.outer_compression", f"compresses DiLoCo's outer sync; needs "
                                f"train.sync=diloco (got '{t.sync}')", t.outer_compression))
    if t.sharding == "fsdp":
        if t.outer_compression != "none":
            # A sharded job's ranks hold one model: there is no average inside the job to compress.
            problems.append(problem("train.outer_compression", "compresses the average of a job's replicas; with "
                                    "train.sharding=fsdp the job's ranks train one model together (leave it none)",
                                    t.outer_compression))
        if t.amp == "fp16":
            # fp16 needs a loss scaler that knows the gradients are sharded; bf16 needs none.
            problems.append(problem("train.amp", "fp16 is not supported with train.sharding=fsdp; use bf16 or auto",
                                    t.amp))
    problems.extend(schema.problems(cfg, world_size))
    return problems


def _state_dir_problem(path: Path) -> str | None:
    """Why the miner could not keep its state under ``path`` (read-only checks), or None."""
    if path.exists():
        if not path.is_dir():
            return "exists and is not a directory"
        return None if os.access(path, os.W_OK | os.X_OK) else "is not writable by this user"
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        return f"cannot be created: {parent} is not a directory"
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is not writable by this user"
    return None


def _has(tree: Mapping[str, Any], parts: list[str]) -> bool:
    node: Any = tree
    for part in parts:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _pop(tree: dict[str, Any], parts: list[str]) -> Any:
    """Remove a dotted key (and the sections it leaves empty); returns its value."""
    node = tree[parts[0]]
    value = node.pop(parts[1]) if len(parts) == 2 else _pop(node, parts[1:])
    if not node:
        del tree[parts[0]]
    return value


def _moved(tree: dict[str, Any], renamed: Mapping[str, str], origin: str, problems: list[str],
           notes: list[str]) -> dict[str, Any]:
    """Move the keys of one source that have a new name to it. Done per source, before they are
    merged, so an old name in the file and the new one in ``--set`` resolve by the usual order."""
    for old, new in renamed.items():
        parts = old.split(".")
        if not _has(tree, parts) or (len(parts) > 1 and not isinstance(_lookup(tree, tuple(parts[:-1])), dict)):
            continue
        value = _pop(tree, parts)
        if _has(tree, new.split(".")):
            problems.append(problem(old, f"is the old name of {new}, which {origin} sets too; keep {new}", value))
            continue
        set_path(tree, new, value, origin, problems)
        note = f"DEPRECATED: config key {old} is now {new}; the old name is read until the next release"
        if note not in notes:
            notes.append(note)
    return tree


def _with_defaults(tree: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Fill the keys the chosen parts set by default, where no source set them.

    A task's defaults are where its needs differ from the other's (the two-tower job turns
    mining on; the language model trains shorter batches of sequences). A key set in the
    file, the environment or ``--set`` always wins, and ``config show`` prints the result.
    """
    filled: dict[str, Any] = {}
    for dotted, value in defaults.items():
        if not _has(tree, dotted.split(".")):
            set_path(filled, dotted, value, "defaults", [])
    return _merge(filled, tree)


def resolve_config(
    schema: Schema,
    path: str | None = None,
    sets: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
    world_size: int | None = None,
) -> Config:
    """Resolve file < env < --set into a validated config of ``schema.model``, or raise ConfigError."""
    env = os.environ if environ is None else environ
    problems: list[str] = []
    notes: list[str] = []
    tree: dict[str, Any] = {}
    for origin, source in (("the config file", lambda: read_file(path) if path else {}),
                           ("the environment", lambda: from_env(env, problems)),
                           ("--set", lambda: from_sets(sets, problems))):
        tree = _merge(tree, _moved(source(), schema.renamed, origin, problems, notes))
    model = schema.model
    tree = resolve(tree, model)
    problems.extend(_unknown_keys(tree, model, ""))
    if problems:
        raise ConfigError(problems)
    tree = _with_defaults(tree, schema.defaults(tree))
    try:
        cfg = model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_validation_lines(exc, tree)) from None
    problems = semantic_problems(cfg, world_size if world_size is not None else world_size_from_env(env), schema)
    if problems:
        raise ConfigError(problems)
    if cfg.api.token_file:
        cfg.api.token = read_token_file(cfg.api.token_file, cfg.api.token is not None)
    cfg._deprecations.extend(notes)
    return cfg


MAX_TOKEN_BYTES = 4096


def read_token_file(path: str, token_set_too: bool) -> SecretStr | None:
    """The token in ``api.token_file``: the file's text without its trailing newline. A missing
    file is no token (a systemd credential that was not created: control routes stay 403)."""
    key = "api.token_file"
    if token_set_too:
        raise ConfigError([problem(key, "set api.token or api.token_file, not both", path)])
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError([problem(key, f"cannot read it: {exc.strerror or exc}", path)]) from None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_TOKEN_BYTES:
        raise ConfigError([problem(key, f"must be a regular file of at most {MAX_TOKEN_BYTES} bytes", path)])
    try:
        text = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([problem(key, f"cannot read it: {exc}", path)]) from None
    return SecretStr(text) if text else None


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.public_dict(), sort_keys=False)
