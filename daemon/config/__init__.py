"""The one typed config tree, and how it is loaded.

``sections.py`` declares every key with its default and limits; ``sources.py`` reads
the file, the environment and ``--set``; ``load.py`` resolves them into a validated
:class:`Config` or raises :class:`ConfigError` with one line per problem;
``secrets.py`` says what is masked.
"""

from daemon.config.errors import ConfigError, problem
from daemon.config.load import load_config, semantic_problems, to_yaml, world_size_from_env
from daemon.config.secrets import SECRET_KEYS, is_secret_key
from daemon.config.sections import (
    ApiConfig,
    CheckpointConfig,
    CompressionConfig,
    Config,
    DataConfig,
    EmbeddingsConfig,
    LmConfig,
    MiningConfig,
    PathsConfig,
    ShutdownConfig,
    TelemetryConfig,
    TrainConfig,
    UploadConfig,
    WatchdogConfig,
)
from daemon.config.sources import ENV_PREFIX
from daemon.urls import MASK, redact_url

__all__ = [
    "ENV_PREFIX",
    "MASK",
    "SECRET_KEYS",
    "ApiConfig",
    "CheckpointConfig",
    "CompressionConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EmbeddingsConfig",
    "LmConfig",
    "MiningConfig",
    "PathsConfig",
    "ShutdownConfig",
    "TelemetryConfig",
    "TrainConfig",
    "UploadConfig",
    "WatchdogConfig",
    "is_secret_key",
    "load_config",
    "problem",
    "redact_url",
    "semantic_problems",
    "to_yaml",
    "world_size_from_env",
]
