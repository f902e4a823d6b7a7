"""What every config section is: a pydantic model that names its place in the tree and
says which of its keys replica groups must agree on.

The core's sections live in ``sections.py``; a task or an outer sync declares its own
in its folder (``lm`` beside the language model, ``twotower``, ``mining`` and
``embeddings`` beside the retrieval task, ``ft`` beside torchft) and the composition
root adds them to the tree. Code that owns a section reads it typed with
``LmConfig.of(cfg)``; the core never names a plug-in's section.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict

if TYPE_CHECKING:
    from typing import Self

# Fits every random generator the miner seeds (numpy's takes 32 bits).
SEED_MAX = 2**32 - 1
DAY = 86_400.0


def _one_or_many(value: Any) -> Any:
    # `--set lm.corpus=docs/` and MINERD_LM__CORPUS=docs/ name one entry; empty names none.
    if isinstance(value, str):
        return [value] if value else []
    return [] if value is None else value


# A list of files, directories or globs that a single string may also name (one entry).
Entries = Annotated[list[str], BeforeValidator(_one_or_many)]


class Section(BaseModel):
    # No inf or nan anywhere: `.inf` seconds passed validation and then broke a timer.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # Its name in the tree (`lm` for `lm.seq_len`).
    key: ClassVar[str] = ""
    # Keys every replica group must share for their updates to be averaged (the model, the data,
    # the optimisation), which go into Config.training_digest: "all", or a set of names. Where
    # each group writes, listens or how long it runs is its own business.
    agreed: ClassVar[frozenset[str] | Literal["all"]] = frozenset()
    # With agreed="all": the keys left out anyway.
    local: ClassVar[frozenset[str]] = frozenset()
    # A section with an `enabled` switch that only one task can use names the feature here,
    # for the line that refuses it with another task ("hard-negative mining needs ...").
    feature: ClassVar[str] = ""

    @classmethod
    def of(cls, cfg: BaseModel) -> Self:
        """This section of ``cfg``, typed; a LookupError when the tree was built without it."""
        section = getattr(cfg, cls.key, None) if cls.key else None
        if not isinstance(section, cls):
            raise LookupError(f"the config has no '{cls.key}' section ({cls.__name__} is not registered)")
        return section

    def agreed_values(self) -> dict[str, Any]:
        """The values of the keys replicas must agree on (empty: none)."""
        data = self.model_dump(mode="json")
        if self.agreed == "all":
            return {k: v for k, v in data.items() if k not in self.local}
        return {k: v for k, v in data.items() if k in self.agreed}


class CrossFieldError(ValueError):
    """A section-level rule broken; carries the key it is about."""

    def __init__(self, key: str, message: str, value: Any) -> None:
        super().__init__(message)
        self.key = key
        self.message = message
        self.value = value
