"""The one typed config tree, and how it is loaded.

``section.py`` says what a section is; ``sections.py`` declares the core's sections
with their defaults and limits (tasks and outer syncs declare theirs in their own
folders); ``sources.py`` reads the file, the environment and ``--set``; ``load.py``
resolves them against the tree the composition root assembles into a validated
:class:`Config`, or raises :class:`ConfigError` with one line per problem;
``secrets.py`` says what is masked.
"""

from daemon.config.errors import ConfigError, problem
from daemon.config.load import Schema, resolve_config, semantic_problems, to_yaml, world_size_from_env
from daemon.config.secrets import SECRET_KEYS, is_secret_key
from daemon.config.section import DAY, SEED_MAX, CrossFieldError, Entries, Section
from daemon.config.sections import (
    ApiConfig,
    CheckpointConfig,
    CompressionConfig,
    Config,
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
    "DAY",
    "ENV_PREFIX",
    "MASK",
    "SECRET_KEYS",
    "SEED_MAX",
    "ApiConfig",
    "CheckpointConfig",
    "CompressionConfig",
    "Config",
    "ConfigError",
    "CrossFieldError",
    "Entries",
    "PathsConfig",
    "Schema",
    "Section",
    "ShutdownConfig",
    "TelemetryConfig",
    "TrainConfig",
    "UploadConfig",
    "WatchdogConfig",
    "is_secret_key",
    "problem",
    "redact_url",
    "resolve_config",
    "semantic_problems",
    "to_yaml",
    "world_size_from_env",
]
