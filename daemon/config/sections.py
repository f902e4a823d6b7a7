"""The core of the one typed config tree: the sections every run has, their keys,
defaults and limits.

Each section validates its own keys (ranges, choices, formats); rules that span
sections or depend on the launch live in ``load.py``. Tasks and outer syncs declare
their own sections in their folders; the composition root (``daemon/run/catalog.py``)
builds the whole tree from this one and theirs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, SecretStr, field_validator

from daemon.config.section import DAY, SEED_MAX, Section
from daemon.urls import MASK, is_host, redact_url


class TrainConfig(Section):
    key = "train"
    agreed = "all"
    # Where a group runs and how long: its own business.
    local = frozenset({"device", "torch_threads", "num_workers", "dist_timeout_seconds", "max_steps", "epochs"})

    task: str = Field("causal_lm", description="the task to train: a name in the task registry (an unknown one "
                      "is refused with the list)")
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
    seed: int = Field(1234, ge=0, le=SEED_MAX)
    torch_threads: int = Field(0, ge=0, description="0 = decided from the machine's cores")
    drop_last: bool = True
    num_workers: int = Field(0, ge=0)
    sync: Literal["ddp", "diloco"] = "diloco"
    outer_compression: Literal["none", "topk", "dct_topk"] = Field(
        "none", description="codec of DiLoCo's outer sync under torchrun (the compression section's settings)"
    )
    max_nonfinite_in_row: int = Field(5, gt=0, description="then the last good checkpoint is restored")
    grad_clip: float = Field(1.0, ge=0, description="0 = off")
    dist_timeout_seconds: float = Field(300, gt=0, le=DAY, description="collective timeout under torchrun")
    sharding: Literal["none", "fsdp"] = Field(
        "none", description="fsdp: the job's ranks hold one model together, each a shard of every block's "
        "parameters, gradients and optimizer state (FSDP2; under torchrun, causal_lm only)")
    outer_offload: bool = Field(False, description="keep the outer step's anchor and momentum in host memory")
    activation_checkpointing: bool = Field(
        False, description="recompute each block's activations in the backward pass instead of keeping them")
    compile: bool = Field(False, description="torch.compile each block (the first steps pay for compiling)")


class UploadConfig(Section):
    key = "upload"

    enabled: bool = True
    min_inner_step: int = Field(50, ge=0)
    every_inner_steps: int = Field(3, gt=0)
    min_interval_seconds: float = Field(
        30, ge=0, le=DAY, description="no revision sooner than this after the last (a floor under every_inner_steps)"
    )
    backend: Literal["local", "s3"] = "local"
    artifact: Literal["weights", "pseudo_gradient", "both"] = Field(
        "weights", description="what a revision carries: the weights, the compressed pseudo-gradient, or both"
    )
    compression: Literal["none", "topk", "dct_topk"] = Field(
        "dct_topk", description="codec of the pseudo-gradient artifact (the compression section's settings)"
    )
    target: str = Field("", description="a directory or s3://bucket/prefix; empty = <state_dir>/uploads")
    endpoint_url: str = ""
    retries: int = Field(5, ge=0)
    keep: int = Field(3, gt=0)
    shard_bytes: int = Field(
        5_000_000_000, ge=1 << 20, description="weights above this are split into model-0000k-of-0000n.safetensors "
        "files of at most this size with model.safetensors.index.json (5 GB: the S3 single-PUT limit)")
    max_age_seconds: float = Field(1800, gt=0, le=30 * DAY)


class TelemetryConfig(Section):
    key = "telemetry"

    log_every: int = Field(1, gt=0)
    slow_step_seconds: float = Field(60, gt=0, le=DAY)
    low_gpu_memory_gb: float = Field(1, ge=0)
    queue_health_every: int = Field(200, gt=0)
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    param_digest: bool = Field(False, description="add a digest of the parameters to each step line")
    peak_tflops: float = Field(
        0, ge=0, description="the device's peak dense bf16 TFLOP/s for MFU; 0 = from a table of known GPUs"
    )


class ApiConfig(Section):
    key = "api"

    enabled: bool = True
    host: str = Field("127.0.0.1", description="an IP address or a host name to listen on")
    port: int = Field(9108, ge=0, le=65535, description="0 = pick a free port (tests)")
    token: SecretStr | None = None
    requests_per_second: float = Field(
        20, gt=0, le=10_000, description="request budget of each client address for /status, /diagnostics and "
        "other routes (the health probes, /metrics and /control/* have their own); over it: wait, then 429"
    )
    metrics_requests_per_second: float = Field(
        0, ge=0, le=10_000, description="request budget of each client address for /metrics; 0 = "
        "api.requests_per_second"
    )
    control_requests_per_second: float = Field(
        0, ge=0, le=10_000, description="request budget of each client address for /control/*; 0 = "
        "api.requests_per_second"
    )
    max_connections: int = Field(
        512, ge=8, le=65_536, description="open connections: past it the one waiting longest for its request "
        "is closed; requests in flight past it less a reserve for the health probes: 503"
    )
    header_timeout_seconds: float = Field(
        5, gt=0, le=60, description="a connection sending no request, or not finishing its headers, within "
        "this many seconds (from connecting or from the last response) is closed"
    )
    token_file: str = Field(
        "", description="a file holding the token (a systemd credential: %d/api-token); instead of api.token"
    )

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not is_host(value):
            raise ValueError("must be an IP address or a host name")
        return value


class WatchdogConfig(Section):
    key = "watchdog"

    stall_seconds: float = Field(600, gt=0, le=7 * DAY)
    exit_on_stall: bool = True


class CheckpointConfig(Section):
    key = "checkpoint"

    every_inner_steps: int = Field(100, gt=0)
    min_interval_seconds: float = Field(
        60, ge=0, le=DAY, description="no periodic checkpoint sooner than this after the last (floor under the steps)"
    )
    keep: int = Field(3, gt=0)


class CompressionConfig(Section):
    """The one codec's settings, for the upload artifact and the outer sync alike."""

    key = "compression"
    agreed = "all"

    # A kept value's index inside its block is an int16: a block may hold at most 32,767 values
    # (181 x 181 = 32,761). A larger side passed validation, published, and made every
    # revision fail verify-upload (and the compressed outer sync fail to decode).
    block: int = Field(64, ge=2, le=181, description="largest block side (blocks of up to block x block; at "
                       "most 181, so that an index in a block fits 16 bits)")
    keep: float = Field(1 / 32, gt=0, le=1, description="share of each block's values sent")
    quantize: bool = Field(True, description="kept values as int8 with one scale per block")


class ShutdownConfig(Section):
    key = "shutdown"

    deadline_seconds: float = Field(30, gt=0, le=3600)


class PathsConfig(Section):
    key = "paths"

    state_dir: str = "./var"


class Config(Section):
    """The core sections. The tree a run is configured by adds the sections of the registered
    tasks and outer syncs (``daemon/run/catalog.py``), read with ``LmConfig.of(cfg)``."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    upload: UploadConfig = Field(default_factory=UploadConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    shutdown: ShutdownConfig = Field(default_factory=ShutdownConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)

    # Old key names the sources used, one line each, for the run to log at start.
    _deprecations: list[str] = PrivateAttr(default_factory=list)

    @property
    def deprecations(self) -> list[str]:
        return list(self._deprecations)

    @property
    def state_dir(self) -> Path:
        return Path(self.paths.state_dir)

    def sections(self) -> dict[str, Section]:
        """Every section of this tree by name, the registered ones included."""
        return {name: value for name in type(self).model_fields if isinstance(value := getattr(self, name), Section)}

    def public_dict(self) -> dict[str, Any]:
        """The resolved config with secrets masked (what `config show` prints): the token, and
        a password in a URL (an S3 endpoint may carry one)."""
        data: dict[str, Any] = self.model_dump(mode="json")
        if self.api.token is not None:
            data["api"]["token"] = MASK
        for key in ("endpoint_url", "target"):
            data["upload"][key] = redact_url(data["upload"][key])
        return data

    def training_digest(self) -> str:
        """A short hash of what replica groups must agree on to average their updates: each
        section's agreed keys (the model, the data and the optimisation; not where each writes
        or listens)."""
        agreed = {name: values for name, section in self.sections().items() if (values := section.agreed_values())}
        return hashlib.sha256(json.dumps(agreed, sort_keys=True).encode()).hexdigest()[:16]

    def digest(self) -> str:
        """A short hash of the config, secrets excluded, for manifests."""
        blob = json.dumps(self.public_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
