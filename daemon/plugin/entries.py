"""What a part registers, and the registries that hold the entries.

Three registries of one shape: tasks (``train.task`` names one), outer syncs (the first
whose ``selects`` accepts the config), data sources (the task's request names one). An
entry names its config sections, the defaults it sets when chosen, the keys it moved,
its checks and its builder. The composition root (``daemon/run/catalog.py``) holds one
registry line per part.

An entry is cheap to import (no torch, no transformers): ``minerd config validate``
reads the sections and defaults and runs the checks without loading a model library.
The builders import their heavy modules when a run is really assembled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from daemon.config import Config, Section

if TYPE_CHECKING:
    import torch
    from torch import nn

    from daemon.plugin.parts import BuildContext, SyncContext, SyncParts, TaskParts


@dataclass(frozen=True)
class DataRequest:
    """Which data source a task reads (its registered name) and what it asks of it: a spec
    the source understands (files and a tokenizer, or a corpus to generate)."""

    source: str
    spec: Any


def no_problems(cfg: Config, world_size: int) -> list[str]:
    return []


@dataclass(frozen=True, kw_only=True)
class Entry:
    name: str
    summary: str
    # Config sections this part declares; they are in every tree, chosen or not.
    sections: tuple[type[Section], ...] = ()
    # Dotted keys this part sets, when chosen, where no source (file, env, --set) set them.
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # Old dotted keys and their new place: read for one release, with a deprecation line.
    renamed: Mapping[str, str] = field(default_factory=dict)
    # Problems as `config error:` lines, when chosen; may read (never write) the file system.
    validate: Callable[[Config, int], list[str]] = no_problems


@dataclass(frozen=True, kw_only=True)
class TaskEntry(Entry):
    # Everything the run needs from this task, finished (see daemon/plugin/parts.py), from
    # the context and what its data source made.
    build: Callable[[BuildContext, Any], TaskParts]
    # Which data source this config reads, and what it asks of it.
    data: Callable[[Config], DataRequest]
    # The task's model as configured, for `minerd diagnose` (no data read, nothing written).
    diagnose_model: Callable[[Config, torch.device], nn.Module]
    # Cores the task's own background threads take (FAISS), left out of torch's threads.
    threads: Callable[[Config], int] = lambda cfg: 0
    # Whether its model can be sharded over a job's ranks (train.sharding=fsdp): it names the
    # repeated blocks to shard (TaskParts.blocks).
    shards: bool = False


@dataclass(frozen=True, kw_only=True)
class SyncEntry(Entry):
    # Whether this config (and world size) asks for this outer sync; entries are asked in
    # registry order and the first that says yes is the run's.
    selects: Callable[[Config, int], bool]
    build: Callable[[SyncContext], SyncParts]
    # Which replica of the job this process trains for (its data order depends on it).
    replica: Callable[[Config], int] = lambda cfg: 0


@dataclass(frozen=True, kw_only=True)
class DataEntry(Entry):
    # What the source makes from a task's request spec (token streams, a generated corpus).
    build: Callable[[BuildContext, Any], Any]
    # Problems with a request's spec as `config error:` lines (missing files, bad globs).
    check: Callable[[Any], list[str]] = lambda spec: []


E = TypeVar("E", bound=Entry)


class Registry(Generic[E]):
    """Entries by name, in registration order; a second entry of one name is refused."""

    def __init__(self, kind: str, entries: Iterable[E] = ()) -> None:
        self.kind = kind
        self._entries: dict[str, E] = {}
        for entry in entries:
            self.register(entry)

    def register(self, entry: E) -> None:
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} '{entry.name}' is registered twice")
        self._entries[entry.name] = entry

    def plus(self, *entries: E) -> Registry[E]:
        """A new registry of these entries after the present ones (this one is unchanged)."""
        return Registry(self.kind, [*self._entries.values(), *entries])

    def __getitem__(self, name: str) -> E:
        return self._entries[name]

    def get(self, name: str) -> E | None:
        return self._entries.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[E]:
        return iter(self._entries.values())

    def names(self) -> list[str]:
        return list(self._entries)
