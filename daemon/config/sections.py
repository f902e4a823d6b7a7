"""The one typed config tree: every section, its keys, defaults and limits.

Each section validates its own keys (ranges, choices, formats); rules that span
sections or depend on the launch live in ``load.py``, and a task's own rules in its
entry (``daemon/tasks``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from daemon.urls import MASK, http_url_problem, is_host, redact_url


class _Section(BaseModel):
    # No inf or nan anywhere: `.inf` seconds passed validation and then broke a timer.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Fits every random generator the miner seeds (numpy's takes 32 bits).
SEED_MAX = 2**32 - 1
DAY = 86_400.0


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
    seed: int = Field(1234, ge=0, le=SEED_MAX)
    torch_threads: int = Field(0, ge=0, description="0 = decided from the machine's cores")
    drop_last: bool = True
    num_workers: int = Field(0, ge=0)
    sync: Literal["ddp", "diloco"] = "diloco"
    outer_compression: Literal["none", "topk", "dct_topk"] = Field(
        "none", description="codec of DiLoCo's outer sync under torchrun (the compression section's settings)"
    )
    hidden_dim: int = Field(1024, gt=0)
    embed_dim: int = Field(128, gt=0)
    temperature: float = Field(0.05, gt=0, le=10)
    max_nonfinite_in_row: int = Field(5, gt=0, description="then the last good checkpoint is restored")
    grad_clip: float = Field(1.0, ge=0, description="0 = off")
    dist_timeout_seconds: float = Field(300, gt=0, le=DAY, description="collective timeout under torchrun")


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
    max_age_seconds: float = Field(1800, gt=0, le=30 * DAY)


class TelemetryConfig(_Section):
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


class ApiConfig(_Section):
    enabled: bool = True
    host: str = Field("127.0.0.1", description="an IP address or a host name to listen on")
    port: int = Field(9108, ge=0, le=65535, description="0 = pick a free port (tests)")
    token: SecretStr | None = None
    requests_per_second: float = Field(
        20, gt=0, le=10_000, description="request budget (the health probes have their own); over it: wait, then 429"
    )
    max_connections: int = Field(512, ge=8, le=65_536, description="open connections and requests in flight; over: 503")
    token_file: str = Field(
        "", description="a file holding the token (a systemd credential: %d/api-token); instead of api.token"
    )

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not is_host(value):
            raise ValueError("must be an IP address or a host name")
        return value


class WatchdogConfig(_Section):
    stall_seconds: float = Field(600, gt=0, le=7 * DAY)
    exit_on_stall: bool = True


class DataConfig(_Section):
    num_docs: int = Field(200_000, ge=16)
    eval_queries: int = Field(2000, ge=1)
    dim: int = Field(128, gt=0)
    cluster_size: int = Field(16, ge=1, description="near-duplicate documents per cluster")
    seed: int = Field(7, ge=0, le=SEED_MAX)


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
        60, ge=0, le=DAY, description="no periodic checkpoint sooner than this after the last (floor under the steps)"
    )
    keep: int = Field(3, gt=0)


class CompressionConfig(_Section):
    """The one codec's settings, for the upload artifact and the outer sync alike."""

    block: int = Field(64, ge=2, le=256, description="largest block side (blocks of up to block x block)")
    keep: float = Field(1 / 32, gt=0, le=1, description="share of each block's values sent")
    quantize: bool = Field(True, description="kept values as int8 with one scale per block")


class FtConfig(_Section):
    """Fault-tolerant outer sync across replica groups (torchft): each machine is a replica
    group; its outer steps go through a quorum the lighthouse forms of the groups alive."""

    enabled: bool = False
    lighthouse: str = Field("", description="the lighthouse's address, http://host:port (torchft_lighthouse --bind)")
    replica_group: int = Field(0, ge=0, le=1_000_000, description="this group's number, unique in the job")
    host: str = Field("", description="name or address peers reach this replica at; empty = the host name")
    min_replicas: int = Field(1, ge=1, le=10_000, description="fewest replica groups an outer step may commit with")
    timeout_seconds: float = Field(60, gt=0, le=DAY, description="an outer sync's collectives")
    quorum_timeout_seconds: float = Field(
        300, gt=0, le=DAY, description="waiting for a quorum; then the round's progress is kept and tried again"
    )
    connect_timeout_seconds: float = Field(10, gt=0, le=3600, description="one try to reach the lighthouse")
    sync_attempts: int = Field(3, ge=1, le=100, description="tries of one outer step before it is left for the next")

    @field_validator("lighthouse")
    @classmethod
    def _lighthouse_url(cls, value: str) -> str:
        if value and http_url_problem(value):
            raise ValueError(f"must be http://host:port ({http_url_problem(value)})")
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if value and not is_host(value):
            raise ValueError("must be an IP address or a host name")
        return value


class ShutdownConfig(_Section):
    deadline_seconds: float = Field(30, gt=0, le=3600)


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
    compression: CompressionConfig = CompressionConfig()
    ft: FtConfig = FtConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    paths: PathsConfig = PathsConfig()

    @property
    def state_dir(self) -> Path:
        return Path(self.paths.state_dir)

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
        """A short hash of what replica groups must agree on to average their updates: the
        model, the data and the optimisation (not where each writes or listens)."""
        data = self.public_dict()
        train = {k: v for k, v in data["train"].items()
                 if k not in ("device", "torch_threads", "num_workers", "dist_timeout_seconds", "max_steps", "epochs")}
        ft = {k: v for k, v in data["ft"].items() if k in ("min_replicas",)}
        agreed = {"train": train, "lm": data["lm"], "data": data["data"], "compression": data["compression"],
                  "embeddings": {"enabled": data["embeddings"].get("enabled")}, "ft": ft}
        return hashlib.sha256(json.dumps(agreed, sort_keys=True).encode()).hexdigest()[:16]

    def digest(self) -> str:
        """A short hash of the config, secrets excluded, for manifests."""
        blob = json.dumps(self.public_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class _CrossFieldError(ValueError):
    """A section-level rule broken; carries the key it is about."""

    def __init__(self, key: str, message: str, value: Any) -> None:
        super().__init__(message)
        self.key = key
        self.message = message
        self.value = value


