"""``.parquet`` pair files: the columns ``query`` and ``document`` (strings), and optionally
``negatives`` (a list of strings) and ``group`` (strings or integers); no other column is read.

A row group is read whole (those columns only) and checked before any text is decoded,
as daemon/data/text/corpus.py checks a text column: its rows, values and uncompressed
size in the file's metadata first, then, read with the string columns
dictionary-encoded (each distinct value once, a small index per row), the size the text
will have once every row holds its own copy, which a value repeated through a dictionary
makes far larger than the metadata says.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from daemon.config import ConfigError
from daemon.data.pairs.rows import make_pair
from daemon.data.pairs.split import Pair
from daemon.data.text.corpus import (
    MAX_DOCUMENT_BYTES,
    MAX_ROW_GROUP_BYTES,
    MAX_ROW_GROUP_ROWS,
    PARQUET_BATCH_ROWS,
    Source,
    _size,
    corpus_error,
    parquet_modules,
)

REQUIRED = ("query", "document")
OPTIONAL = ("negatives", "group")


def _columns(pa: Any, schema: Any, source: Source) -> tuple[list[str], list[str]]:
    """The columns to read and the leaf paths to read dictionary-encoded, or one line about
    a column that is missing or of the wrong type."""
    path, origin = source.path, source.origin
    names = [n for n in (*REQUIRED, *OPTIONAL) if n in schema.names]
    missing = [n for n in REQUIRED if n not in names]
    if missing:
        raise corpus_error(f'{path} has no "{missing[0]}" column', schema.names[:5], origin)

    def text(t: Any) -> bool:
        return bool(pa.types.is_string(t) or pa.types.is_large_string(t))

    dictionary = list(REQUIRED)
    for name in names:
        t = schema.field(name).type
        if name in REQUIRED:
            ok = text(t)
        elif name == "negatives":
            ok = (pa.types.is_list(t) or pa.types.is_large_list(t)) and text(t.value_type)
            dictionary.append("negatives")  # its leaf path, named by the writer, is found in the footer
        else:
            ok = text(t) or (pa.types.is_integer(t))
            if text(t):
                dictionary.append("group")
        if not ok:
            raise corpus_error(f'the "{name}" column of {path} is of type {t}, not what a pair holds '
                               f"(strings; negatives a list of strings; group strings or integers)", str(t), origin)
    return names, dictionary


def _check_decoded(pa: Any, pc: Any, column: Any, where: str, source: Source) -> int:
    """The bytes ``column`` (dictionary-encoded strings, or lists of them) takes once
    decoded, or one line when one value is over MAX_DOCUMENT_BYTES."""
    total = 0
    for chunk in column.chunks:
        if pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
            chunk = chunk.flatten()
        if not pa.types.is_dictionary(chunk.type):
            chunk = chunk.dictionary_encode()
        if len(chunk) == 0:
            continue
        sizes = pc.take(pc.binary_length(chunk.dictionary), chunk.indices)
        if (pc.max(sizes).as_py() or 0) > MAX_DOCUMENT_BYTES:
            raise corpus_error(f"{where} holds a text over the {_size(MAX_DOCUMENT_BYTES)} a text may hold",
                               str(source.path), source.origin)
        total += pc.sum(sizes).as_py() or 0
    return total


def parquet_pairs(source: Source) -> Iterator[Pair]:
    """Each row's pair, a row group at a time, never more than MAX_ROW_GROUP_BYTES of text
    decoded at once."""
    pa, pc, pq = parquet_modules(source)
    path, origin = source.path, source.origin
    try:
        footer = pq.ParquetFile(path)
        names, dictionary = _columns(pa, footer.schema_arrow, source)
        paths = [c.path for c in footer.schema]
        dictionary = [next(p for p in paths if p.startswith("negatives.")) if n == "negatives" else n
                      for n in dictionary]
        pf = pq.ParquetFile(path, read_dictionary=dictionary)  # reads the footer only
    except ConfigError:
        raise
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for a file that is not parquet
        raise corpus_error(f"{path} is not a readable parquet file: {exc}", str(path), origin) from None
    meta = pf.metadata
    leaves = [j for j in range(meta.num_columns) if meta.schema.column(j).path.split(".")[0] in names]
    row = 0
    for group in range(meta.num_row_groups):
        where = f"row group {group + 1} of {path}"
        rg = meta.row_group(group)
        stored = sum(rg.column(j).total_uncompressed_size for j in leaves)
        values = max([rg.num_rows] + [rg.column(j).num_values for j in leaves])
        if stored > MAX_ROW_GROUP_BYTES or values > MAX_ROW_GROUP_ROWS:
            raise corpus_error(f"{where} holds {_size(stored)} uncompressed in {rg.num_rows} rows ({values} values "
                               f"in a column), over the {_size(MAX_ROW_GROUP_BYTES)} or {MAX_ROW_GROUP_ROWS} values "
                               f"a row group may hold; write the file with smaller row groups (pyarrow: "
                               f"write_table(..., row_group_size=...))", str(path), origin)
        try:
            table = pf.read_row_group(group, columns=names)
            decoded = sum(_check_decoded(pa, pc, table.column(n), where, source) for n in names if n != "group"
                          or pa.types.is_dictionary(table.schema.field(n).type))
        except ConfigError:
            raise
        except Exception as exc:  # a damaged page, bad compression, text that is not UTF-8
            raise corpus_error(f"{where} cannot be read: {exc}", str(path), origin) from None
        if decoded > MAX_ROW_GROUP_BYTES:
            raise corpus_error(f"{where} holds more than {_size(MAX_ROW_GROUP_BYTES)} of text once decoded "
                               f"({_size(stored)} stored: its values repeat through a dictionary), over what a "
                               f"row group may hold", str(path), origin)
        for start in range(0, table.num_rows, PARQUET_BATCH_ROWS):
            batch = table.slice(start, PARQUET_BATCH_ROWS).to_pylist()  # decoded text, bounded just above
            for fields in batch:
                row += 1
                yield make_pair(fields, f"row {row} of {path}", source)
