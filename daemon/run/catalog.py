"""The registries: every task, outer sync and data source minerd knows, one line each.

A :class:`Catalog` is also the config's :class:`~daemon.config.Schema`: it assembles the
whole config tree (the core's sections and each registered part's), knows the keys that
moved, the chosen task's defaults, and runs the chosen parts' checks plus the rules
between parts, from one place:

- a section a task declares with an ``enabled`` switch (``mining``, ``embeddings``)
  turned on with another task is one line: ``<key>.enabled: <feature> needs
  train.task=<task>``;
- two outer syncs across machines switched on at once is one line;
- the data source the task asks for must be registered, and its request must check.

Importing this module loads no model library: ``minerd config validate`` stays quick.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import Field, create_model

from daemon.config import Config, ConfigError, Section, TrainConfig, problem, resolve_config
from daemon.data import generated, pairs, text
from daemon.plugin.entries import DataEntry, Entry, Registry, SyncEntry, TaskEntry
from daemon.sync import diloco, exchange, none, torchft
from daemon.tasks import causal_lm, twotower


class Catalog:
    def __init__(self, tasks: Iterable[TaskEntry], syncs: Iterable[SyncEntry], data: Iterable[DataEntry]) -> None:
        self.tasks: Registry[TaskEntry] = Registry("task", tasks)
        # Asked in this order which one the config selects: the last says yes to anything.
        self.syncs: Registry[SyncEntry] = Registry("outer sync", syncs)
        self.data: Registry[DataEntry] = Registry("data source", data)
        _ = self.model  # refuses two parts declaring one section now, not at the first load

    def plus(self, tasks: Iterable[TaskEntry] = (), syncs: Iterable[SyncEntry] = (),
             data: Iterable[DataEntry] = ()) -> Catalog:
        """A catalog with these parts added (syncs before the present ones: asked first)."""
        return Catalog([*self.tasks, *tasks], [*syncs, *self.syncs], [*self.data, *data])

    def _entries(self) -> list[Entry]:
        return [*self.tasks, *self.syncs, *self.data]

    # ---- the config's Schema ------------------------------------------------------
    @functools.cached_property
    def model(self) -> type[Config]:
        """The whole tree: the core's sections, then every registered part's."""
        fields: dict[str, Any] = {}
        owners: dict[str, str] = {}
        for entry in self._entries():
            for section in entry.sections:
                if section.key in Config.model_fields or section.key in owners:
                    theirs = owners.get(section.key, "the core")
                    raise ValueError(f"section '{section.key}' of {entry.name} is declared by {theirs} already")
                owners[section.key] = entry.name
                fields[section.key] = (section, Field(default_factory=section))
        model: type[Config] = create_model("Config", __base__=Config, **fields)
        return model

    @functools.cached_property
    def renamed(self) -> Mapping[str, str]:
        out: dict[str, str] = {}
        for entry in self._entries():
            for old, new in entry.renamed.items():
                if old in out:
                    raise ValueError(f"config key {old} is renamed by two parts")
                out[old] = new
        return out

    def defaults(self, tree: Mapping[str, Any]) -> Mapping[str, Any]:
        train = tree.get("train")
        name = train.get("task") if isinstance(train, Mapping) else None
        entry = self.tasks.get(name if isinstance(name, str) else TrainConfig.model_fields["task"].default)
        return entry.defaults if entry is not None else {}  # an unknown task is reported by problems()

    def problems(self, cfg: Config, world_size: int) -> list[str]:
        task = self.tasks.get(cfg.train.task)
        if task is None:
            return [problem("train.task", f"unknown task; one of {', '.join(self.tasks.names())}", cfg.train.task)]
        out = list(task.validate(cfg, world_size))
        out.extend(_block_options(cfg, task, [t.name for t in self.tasks if t.shards]))
        for other in self.tasks:
            if other is not task:
                out.extend(_switched_on(cfg, other))
        request = task.data(cfg)
        source = self.data.get(request.source)
        if source is None:
            out.append(problem("train.task", f"reads data source '{request.source}', which is not registered "
                               f"(known: {', '.join(self.data.names())})", cfg.train.task))
        else:
            out.extend(source.check(request.spec))
        out.extend(self._sync_conflicts(cfg))
        out.extend(self.sync_for(cfg, world_size).validate(cfg, world_size))
        return out

    def _sync_conflicts(self, cfg: Config) -> list[str]:
        switches = [f"{s.key}.enabled" for entry in self.syncs for s in entry.sections
                    if getattr(s.of(cfg), "enabled", False)]
        if len(switches) < 2:
            return []
        return [problem(switches[1], f"one outer sync across machines at a time: {' and '.join(switches)} are "
                        "both on", True)]

    # ---- choosing parts -----------------------------------------------------------
    def sync_for(self, cfg: Config, world_size: int) -> SyncEntry:
        return next(entry for entry in self.syncs if entry.selects(cfg, world_size))

    def meta_model(self, cfg: Config) -> Any:
        """The configured task's model on PyTorch's ``meta`` device: its shapes, no storage (what
        the memory plan counts, for a model of any size on any machine)."""
        import torch

        return self.task_for(cfg).diagnose_model(cfg, torch.device("meta"))

    def task_for(self, cfg: Config) -> TaskEntry:
        return self.tasks[cfg.train.task]

    # ---- loading -------------------------------------------------------------------
    def load(self, path: str | None = None, sets: Iterable[str] = (), environ: Mapping[str, str] | None = None,
             world_size: int | None = None) -> Config:
        """The config from file < env < --set, validated against this catalog's parts."""
        return resolve_config(self, path, sets, environ, world_size)

    def default_config(self) -> Config:
        return self.model()


def _switched_on(cfg: Config, owner: TaskEntry) -> list[str]:
    """Another task's feature turned on: it would be silently ignored, so it is refused."""
    out = []
    for section in owner.sections:
        if section.feature and getattr(section.of(cfg), "enabled", False):
            out.append(problem(f"{section.key}.enabled", f"{section.feature} needs train.task={owner.name}",
                               cfg.train.task))
    return out


CATALOG = Catalog(
    tasks=[causal_lm.ENTRY, twotower.ENTRY],
    syncs=[torchft.ENTRY, exchange.ENTRY, diloco.ENTRY, none.ENTRY],
    data=[text.ENTRY, generated.ENTRY, pairs.ENTRY],
)


def load_config(path: str | None = None, sets: Iterable[str] = (), environ: Mapping[str, str] | None = None,
                world_size: int | None = None) -> Config:
    """The config of a run of the registered parts (what ``minerd`` loads)."""
    return CATALOG.load(path, sets, environ, world_size)


__all__ = ["CATALOG", "Catalog", "ConfigError", "Section", "load_config"]


def _block_options(cfg: Config, task: TaskEntry, able: list[str]) -> list[str]:
    """Sharding, activation checkpointing and compiling work block by block: a task whose model
    names no repeated blocks refuses them."""
    if task.shards:
        return []
    t = cfg.train
    asked = [("train.sharding", t.sharding, t.sharding != "none", "none"),
             ("train.activation_checkpointing", t.activation_checkpointing, t.activation_checkpointing, "false"),
             ("train.compile", t.compile, t.compile, "false")]
    return [problem(key, f"works on a model's repeated blocks, which the {task.name} task's model does not have "
                    f"(tasks that have them: {', '.join(able) or 'none'}); set {key}={off}", value)
            for key, value, on, off in asked if on]
