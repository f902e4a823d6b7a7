"""(query, document) pairs for the two-tower retrieval task: what each pair is and which are
held out (``split``), the ``code`` corpus of docstrings and the functions they describe,
read from the interpreter's own Python sources (``code``), and the ``pairs`` corpus of the
user's own ``.jsonl``/``.parquet`` files (``files``).

Nothing here imports a model library, so ``minerd config validate`` can check the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.config import ConfigError
from daemon.data.pairs.spec import PairsSpec
from daemon.plugin.entries import DataEntry

if TYPE_CHECKING:
    from daemon.plugin.parts import BuildContext


def check(spec: PairsSpec) -> list[str]:
    """A ``pairs`` corpus's files are there, regular files of a kind it reads, and not too many
    (each stat'ed; none opened)."""
    if spec.corpus != "pairs":
        return []
    from daemon.data.pairs.files import discover_pairs

    try:
        discover_pairs(list(spec.entries))
    except ConfigError as exc:
        return exc.problems
    return []


def build(ctx: BuildContext, spec: PairsSpec) -> Any:
    """The corpus of token ids (``tokens.py``), made once by rank 0 and read by the others."""
    from daemon.data.pairs.code import code_pairs, code_sources
    from daemon.data.pairs.files import discover_pairs, read_pairs
    from daemon.data.pairs.tokens import load_or_make
    from daemon.data.text.build import main_rank_first

    with main_rank_first(ctx.launch):
        if spec.corpus == "pairs":
            sources = discover_pairs(list(spec.entries))
            return load_or_make(spec, [s.path for s in sources], lambda: read_pairs(sources),
                                ctx.cfg.state_dir / "data")
        roots = [Path(p).expanduser() for p in spec.code_paths] or None
        files = code_sources(roots)
        return load_or_make(spec, [s.path for s in files], lambda: code_pairs(roots), ctx.cfg.state_dir / "data")


ENTRY = DataEntry(
    name="pairs",
    summary="(query, document) pairs of real text, tokenized once: the code corpus of docstrings and functions "
            "on this machine, or the user's .jsonl/.parquet pairs",
    build=build,
    check=check,
)

__all__ = ["ENTRY", "PairsSpec"]
