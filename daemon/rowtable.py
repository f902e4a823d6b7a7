"""Large tables that training changes a few rows at a time, and which rows changed.

The two-tower task's ID embeddings are a table of one row per document, trained
with a row-wise Adam that keeps two moments and a step count per row: four arrays
that share one row space, hundreds of megabytes together, of which one inner step
touches a batch's worth of rows. Rewriting them whole at every checkpoint was most
of what the default two-tower job wrote to disk. So the checkpoint writes them in
full once (a base) and after that only the rows changed since that base, until so
many have changed that a new base is cheaper (``daemon/checkpoint.py``).

``RowChanges`` records, for each row, the version at which it last changed. A
version belongs to a lineage: a random name that changes whenever the table is
replaced wholesale (created, or loaded from a checkpoint or a peer), so a delta is
only ever taken against a base written from the same history.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
import torch


class RowChanges:
    """Where each of ``num_rows`` rows last changed, counted in update operations."""

    def __init__(self, num_rows: int) -> None:
        self.row_version = np.zeros(num_rows, np.int64)
        self.version = 0
        self.lineage = uuid.uuid4().hex

    def mark(self, rows: np.ndarray) -> None:
        self.version += 1
        self.row_version[rows] = self.version

    def restart(self) -> None:
        """The table was replaced wholesale: no earlier base describes it any more."""
        self.row_version[:] = 0
        self.version = 0
        self.lineage = uuid.uuid4().hex


@dataclass
class RowTable:
    """Tensors of one row space, as a checkpoint stores them: in full or as changed rows.

    ``row_version``/``version``/``lineage`` come from :class:`RowChanges` and are only
    used to choose what to write; they are not stored (a loaded table starts a new
    lineage). A ``RowTable`` read back from a checkpoint always holds full tensors.
    """

    tensors: dict[str, torch.Tensor]
    lineage: str = ""
    version: int = 0
    row_version: torch.Tensor | None = None

    @classmethod
    def snapshot(cls, tensors: dict[str, torch.Tensor], changes: RowChanges) -> RowTable:
        return cls(tensors, changes.lineage, changes.version, torch.from_numpy(changes.row_version.copy()))

    @property
    def num_rows(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    def changed_since(self, version: int) -> torch.Tensor:
        """Row indices changed after ``version`` of this lineage (int64, ascending)."""
        if self.row_version is None:
            raise ValueError("this table carries no change record")
        return torch.nonzero(self.row_version > version).flatten()
