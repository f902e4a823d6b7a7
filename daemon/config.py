"""The one typed config tree, and how it is loaded.

Sources, later wins: the YAML file < ``MINERD_<SECTION>__<KEY>`` environment
variables < ``--set section.key=value``. Every problem becomes one line
``config error: <key.path>: <what is wrong> (got <value>)``; nothing here
touches the state directory, so a bad config never leaves anything behind.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

ENV_PREFIX = "MINERD_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainConfig(_Section):
    task: str = Field("causal_lm", description="a registered task: causal_lm or twotower")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    batch_size: int = Field(256, gt=0, description="micro-batch per process")
    effective_batch_size: int = Field(256, gt=0, description="samples per inner step over all ranks")
    inner_steps_per_outer: int = Field(500, gt=0)
    outer_lr: float = Field(0.7, gt=0, le=10)
    outer_momentum: float = Field(0.9, ge=0, lt=1)
    lr: float = Field(1e-3, gt=0, le=1)
    warmup_steps: int = Field(100, ge=0, description="linear LR warm-up, in global inner steps")
    weight_decay: float = Field(0.01, ge=0)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    epochs: int = Field(0, ge=0, description="stop after this many epochs; 0 = no limit")
    max_steps: int = Field(0, ge=0, description="total inner steps over the whole training; 0 = forever")
    seed: int = 1234
    torch_threads: int = Field(0, ge=0, description="0 = decided from the machine's cores")
    drop_last: bool = True
    num_workers: int = Field(0, ge=0)
    sync: Literal["ddp", "diloco"] = "diloco"
    hidden_dim: int = Field(1024, gt=0)
    embed_dim: int = Field(128, gt=0)
    temperature: float = Field(0.05, gt=0, le=10)
    max_nonfinite_in_row: int = Field(5, gt=0, description="then the last good checkpoint is restored")
    grad_clip: float = Field(1.0, ge=0, description="0 = off")
    dist_timeout_seconds: float = Field(300, gt=0, description="collective timeout under torchrun")


class MiningConfig(_Section):
    enabled: bool = Field(False, description="hard-negative mining (twotower only; on by default there)")
    start_epoch: int = Field(6, ge=0)
    qbatch: int = Field(2048, gt=0)
    ttl: int = Field(5, ge=1)
    prefetch: int = Field(3, ge=1)
    num_negatives: int = Field(16, ge=1)
    hardneg_frac: float = Field(0.5, ge=0, le=1)
    cos_min: float = Field(0.84, ge=-1, le=1)
    cos_max: float = Field(0.96, ge=-1, le=1)
    refresh_steps: int = Field(3000, gt=0)
    fifo_max: int = Field(8, gt=0)
    index: Literal["flat", "ivf", "hnsw"] = "flat"
    faiss_threads: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _window(self) -> MiningConfig:
        if self.cos_min >= self.cos_max:
            raise _CrossFieldError(
                "cos_min", f"must be below mining.cos_max ({self.cos_max})", self.cos_min
            )
        return self


class EmbeddingsConfig(_Section):
    enabled: bool = Field(
        False, description="trainable per-document ID embeddings (twotower only; on by default there)"
    )
    storage_mode: Literal["memory", "disk"] = "memory"
    dir: str = Field("", description="empty = <paths.state_dir>/embeddings")
    chunk_size: int = Field(1024, gt=0)
    cache_l1_mb: float = Field(256, ge=0)
    cache_l2_mb: float = Field(512, ge=0)
    enable_l3: bool = True
    sync_batch_size: int = Field(10, gt=0)
    auto_sync: bool = True


class UploadConfig(_Section):
    enabled: bool = True
    min_inner_step: int = Field(50, ge=0)
    every_inner_steps: int = Field(3, gt=0)
    min_interval_seconds: float = Field(
        30, ge=0, description="no revision sooner than this after the last (a floor under every_inner_steps)"
    )
    backend: Literal["local", "s3"] = "local"
    target: str = Field("", description="a directory or s3://bucket/prefix; empty = <state_dir>/uploads")
    endpoint_url: str = ""
    retries: int = Field(5, ge=0)
    keep: int = Field(3, gt=0)
    max_age_seconds: float = Field(1800, gt=0)


class TelemetryConfig(_Section):
    log_every: int = Field(1, gt=0)
    slow_step_seconds: float = Field(60, gt=0)
    low_gpu_memory_gb: float = Field(1, ge=0)
    queue_health_every: int = Field(200, gt=0)
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    param_digest: bool = Field(False, description="add a digest of the parameters to each step line")
    peak_tflops: float = Field(
        0, ge=0, description="the device's peak dense bf16 TFLOP/s for MFU; 0 = from a table of known GPUs"
    )


class ApiConfig(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535, description="0 = pick a free port (tests)")
    token: SecretStr | None = None


class WatchdogConfig(_Section):
    stall_seconds: float = Field(600, gt=0)
    exit_on_stall: bool = True


class DataConfig(_Section):
    num_docs: int = Field(200_000, ge=16)
    eval_queries: int = Field(2000, ge=1)
    dim: int = Field(128, gt=0)
    cluster_size: int = Field(16, ge=1, description="near-duplicate documents per cluster")
    seed: int = 7


class LmConfig(_Section):
    """The causal language-model task (``train.task=causal_lm``)."""

    preset: Literal["tiny", "small", "llama-1b"] = Field("tiny", description="model shape (ignored with init_from)")
    init_from: str = Field("", description="a local Hugging Face model directory to continue from")
    tokenizer: str = Field("", description="tokenizer.json or a tokenizer directory; empty = BPE trained on the corpus")
    vocab_size: int = Field(8192, ge=512, le=1_048_576, description="size of the BPE trained on the corpus")
    corpus: list[str] = Field(
        default_factory=list,
        description="files, directories or globs (.txt .md .py .jsonl .parquet); empty = the standard library",
    )
    seq_len: int = Field(256, ge=8, description="tokens per training sequence")
    eval_fraction: float = Field(0.01, gt=0, lt=1, description="share of documents held out, chosen by path hash")
    eval_every_steps: int = Field(200, gt=0, description="inner steps between held-out evaluations")
    eval_sequences: int = Field(64, gt=0, description="held-out sequences evaluated each time")

    @field_validator("corpus", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        # `--set lm.corpus=docs/` and MINERD_LM__CORPUS=docs/ name one entry.
        if isinstance(value, str):
            return [value] if value else []
        return [] if value is None else value


class CheckpointConfig(_Section):
    every_inner_steps: int = Field(100, gt=0)
    min_interval_seconds: float = Field(
        60, ge=0, description="no periodic checkpoint sooner than this after the last (a floor under every_inner_steps)"
    )
    keep: int = Field(3, gt=0)


class ShutdownConfig(_Section):
    deadline_seconds: float = Field(30, gt=0)


class PathsConfig(_Section):
    state_dir: str = "./var"


class Config(_Section):
    train: TrainConfig = TrainConfig()
    mining: MiningConfig = MiningConfig()
    embeddings: EmbeddingsConfig = EmbeddingsConfig()
    upload: UploadConfig = UploadConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    api: ApiConfig = ApiConfig()
    watchdog: WatchdogConfig = WatchdogConfig()
    data: DataConfig = DataConfig()
    lm: LmConfig = LmConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    paths: PathsConfig = PathsConfig()

    @property
    def state_dir(self) -> Path:
        return Path(self.paths.state_dir)

    def public_dict(self) -> dict[str, Any]:
        """The resolved config with secrets masked (what `config show` prints)."""
        data: dict[str, Any] = self.model_dump(mode="json")
        if self.api.token is not None:
            data["api"]["token"] = "********"
        return data

    def digest(self) -> str:
        """A short hash of the config, secrets excluded, for manifests."""
        blob = json.dumps(self.public_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


SECRET_KEYS = {("api", "token")}


class _CrossFieldError(ValueError):
    """A section-level rule broken; carries the key it is about."""

    def __init__(self, key: str, message: str, value: Any) -> None:
        super().__init__(message)
        self.key = key
        self.message = message
        self.value = value


class ConfigError(Exception):
    """Every problem found, one formatted line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def problem(path: str, what: str, value: Any) -> str:
    if path.endswith("token") and value is not None:
        value = "********"
    return f"config error: {path}: {what} (got {_show(value)})"


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    return str(value)


def _parse_scalar(text: str) -> Any:
    """Values from env and --set are YAML scalars: 5 is an int, true a bool."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _read_file(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([problem("--config", "file not found", path)]) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError([problem("--config", f"cannot read file: {reason}", path)]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        what = getattr(exc, "problem", None) or "malformed YAML"
        raise ConfigError([f"config error: {where}: malformed YAML: {what}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([problem("--config", "the file must hold a mapping of sections", path)])
    return data


def _set_path(tree: dict[str, Any], dotted: str, value: Any, origin: str, problems: list[str]) -> None:
    parts = [p for p in dotted.split(".") if p]
    if len(parts) < 2:
        problems.append(problem(dotted or origin, f"{origin} needs section.key=value", dotted))
        return
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            problems.append(problem(dotted, "is not a section", child))
            return
        node = child
    node[parts[-1]] = value


def _from_env(environ: Mapping[str, str], problems: list[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        _set_path(tree, dotted, _parse_scalar(raw), name, problems)
    return tree


def _from_sets(sets: Iterable[str], problems: list[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            problems.append(problem("--set", "expected section.key=value", item))
            continue
        _set_path(tree, key.strip(), _parse_scalar(raw.strip()), "--set", problems)
    return tree


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
            problems.append(problem(path, f"unknown key{hint}", value))
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
        if isinstance(cross, _CrossFieldError):
            path = ".".join(str(p) for p in loc) + f".{cross.key}"
            lines.append(problem(path, cross.message, cross.value))
            continue
        path = ".".join(str(p) for p in loc)
        msg = err["msg"][0].lower() + err["msg"][1:]
        lines.append(problem(path, msg, _lookup(tree, loc) if loc else err.get("input")))
    return lines


def world_size_from_env(environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    try:
        return max(1, int(env.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def semantic_problems(cfg: Config, world_size: int) -> list[str]:
    """Rules that span sections or depend on the launch (world size), then the task's own."""
    from daemon.tasks import TASKS  # the registry's entries import this module

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
    if cfg.upload.backend == "s3" and cfg.upload.enabled and not cfg.upload.target.startswith("s3://"):
        problems.append(
            problem("upload.target", "must be s3://bucket/prefix with upload.backend=s3", cfg.upload.target)
        )
    entry = TASKS.get(t.task)
    if entry is None:
        problems.append(problem("train.task", f"unknown task; one of {', '.join(TASKS)}", t.task))
    else:
        problems.extend(entry.validate(cfg, world_size))
    return problems


def _has(tree: Mapping[str, Any], parts: list[str]) -> bool:
    node: Any = tree
    for part in parts:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _with_task_defaults(tree: dict[str, Any]) -> dict[str, Any]:
    """Fill the keys the chosen task sets by default, where no source set them.

    A task's defaults are where its needs differ from the other's (the two-tower job turns
    mining on; the language model trains shorter batches of sequences). A key set in the
    file, the environment or ``--set`` always wins, and ``config show`` prints the result.
    """
    from daemon.tasks import TASKS

    train = tree.get("train")
    task = train.get("task") if isinstance(train, Mapping) else None
    entry = TASKS.get(task if isinstance(task, str) else TrainConfig.model_fields["task"].default)
    if entry is None:
        return tree  # reported by semantic_problems
    defaults: dict[str, Any] = {}
    for dotted, value in entry.defaults.items():
        parts = dotted.split(".")
        if not _has(tree, parts):
            _set_path(defaults, dotted, value, "task defaults", [])
    return _merge(defaults, tree)


def load_config(
    path: str | None = None,
    sets: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
    world_size: int | None = None,
) -> Config:
    """Resolve file < env < --set into a validated Config, or raise ConfigError."""
    env = os.environ if environ is None else environ
    problems: list[str] = []
    tree: dict[str, Any] = _read_file(path) if path else {}
    tree = _merge(tree, _from_env(env, problems))
    tree = _merge(tree, _from_sets(sets, problems))
    problems.extend(_unknown_keys(tree, Config, ""))
    if not problems:
        tree = _with_task_defaults(tree)
    if problems:
        raise ConfigError(problems)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_validation_lines(exc, tree)) from None
    problems = semantic_problems(cfg, world_size if world_size is not None else world_size_from_env(env))
    if problems:
        raise ConfigError(problems)
    return cfg


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.public_dict(), sort_keys=False)
