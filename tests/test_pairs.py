"""The (query, document) pair corpora of the retrieval task: the code corpus drawn from the
interpreter's own sources, the user's pair files, and the held-out split."""

from __future__ import annotations

import ast
import json
import os
import random
from pathlib import Path

import pytest

from daemon.config import ConfigError
from daemon.cores import machine_cores
from daemon.data.pairs import code
from daemon.data.pairs.code import code_pairs, code_sources, functions_in, pairs_from_source, query_of
from daemon.data.pairs.files import discover_pairs, load_pairs
from daemon.data.pairs.split import Pair, is_held_out, split
from daemon.data.text.corpus import stdlib_root

SOURCE = '''
import functools


def documented(x):
    """Add one to the number given.

    A second paragraph the query leaves out.
    """
    # keep this comment
    return x + 1


def short(x):
    """Add one."""
    return x + 1


def bare(x):
    return x


def only_doc():
    """This body holds nothing but a docstring."""


class Box:
    @functools.cache
    def method(self):
        """Return the box's contents, cached."""
        return self.contents

    async def fetch(self):
        """Fetch the contents over the network."""
        await self.load()
'''


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


class TestCodePairs:
    """Each documented function becomes one pair: its first docstring paragraph and its source
    without the docstring."""

    def test_pairs_from_source(self) -> None:
        pairs = list(pairs_from_source(SOURCE))
        assert [q for q, _ in pairs] == ["Add one to the number given.", "Return the box's contents, cached.",
                                         "Fetch the contents over the network."]
        assert pairs[0][1] == "def documented(x):\n    # keep this comment\n    return x + 1"
        assert pairs[1][1] == "@functools.cache\ndef method(self):\n    return self.contents"
        assert pairs[2][1].startswith("async def fetch(self):\n    await")

    def test_query_of(self) -> None:
        assert query_of("\n    Two   words\n    and more.\n\n    Rest.") == "Two words and more."
        assert query_of("Too short.") is None

    def test_walk(self, tmp_path: Path) -> None:
        root = tmp_path / "lib"
        _write(root / "b.py", SOURCE)
        _write(root / "a.py", SOURCE.replace("x + 1", "x + 2"))
        _write(root / "pkg" / "dup.py", SOURCE)  # the same bodies again: kept once, from b.py
        _write(root / "broken.py", "def f(:\n")
        _write(root / "bad_coding.py", "# -*- coding: no-such-codec -*-\n")
        _write(root / "nul.py", "x = 1\0\n")
        _write(root / "tests" / "test_x.py", SOURCE.replace("x + 1", "x + 3"))
        _write(root / "__pycache__" / "c.py", SOURCE.replace("x + 1", "x + 4"))
        _write(tmp_path / "elsewhere" / "linked.py", SOURCE.replace("x + 1", "x + 5"))
        (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
        os.mkfifo(root / "fifo.py")  # would block a reader forever
        _write(root / "huge.py", SOURCE.replace("x + 1", "x + 6") + "#" * (3 << 20))
        pairs = code_pairs([root])
        documents = [p.document for p in pairs]
        # a.py gives three; b.py only the one body that differs, the rest are duplicates
        assert len(pairs) == 4 and len(set(documents)) == 4
        assert "x + 2" in documents[0] and "x + 1" in documents[3]  # a.py, then b.py
        assert not any(f"x + {n}" in d for n in (3, 4, 5, 6) for d in documents)
        assert len({p.group for p in pairs}) == 2 and pairs[0].group != pairs[3].group
        assert code_pairs([root]) == pairs

    def test_worker_processes_give_what_one_process_gives(self, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
        root = tmp_path / "lib"
        for i in range(12):  # every third file repeats an earlier one's bodies: kept once, from the first
            _write(root / f"m{i:02d}.py", SOURCE.replace("x + 1", f"x + {i - i % 3}"))
        monkeypatch.setattr(code, "_workers", lambda groups: 1)
        alone = code_pairs([root])
        monkeypatch.undo()
        monkeypatch.setattr(code, "_GROUP", 1)  # a file per task: as many tasks as files
        assert code._workers(12) == min(machine_cores(), 8)  # 2 on a CI machine: the pool runs
        assert code_pairs([root]) == alone
        assert len(alone) == 3 + 3  # the first file's three bodies, then one per new variant

    def test_functions_in_finds_what_ast_walk_finds(self) -> None:
        """The statement-only walk misses no function: checked on standard-library files with
        functions in classes, conditionals, try blocks, with blocks and other functions."""
        checked = 0
        for source in code_sources([stdlib_root()])[::8]:
            try:
                tree = ast.parse(source.path.read_bytes())
            except (SyntaxError, ValueError):
                continue
            every = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
            assert sorted(map(id, functions_in(tree))) == sorted(map(id, every)), source.path
            checked += len(every)
        assert checked > 1_000
        match = "match x:\n    case 1:\n        def f(): pass\n"
        try_ = "try:\n    pass\nexcept E:\n    def g(): pass\nelse:\n    def h(): pass\nfinally:\n    def i(): pass\n"
        nested = "class C:\n    if t:\n        with w:\n            async def j():\n                def k(): pass\n"
        names = sorted(f.name for f in functions_in(ast.parse(match + try_ + nested)))
        assert names == ["f", "g", "h", "i", "j", "k"]

    def test_standard_library(self) -> None:
        """The real standard library: thousands of pairs, each document once, the same every
        run, and no document still holding its docstring."""
        pairs = code_pairs([stdlib_root()])
        assert len(pairs) >= 5_000
        assert len({p.document for p in pairs}) == len(pairs)
        assert all(p.group for p in pairs)
        for pair in pairs:
            function = ast.parse(pair.document).body[0]
            assert isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
            docstring = ast.get_docstring(function, clean=False)
            assert docstring is None or query_of(docstring) != pair.query
        assert code_pairs([stdlib_root()]) == pairs


class TestSplit:
    """A pair is held out by the sha256 of its group, or its document: stable everywhere."""

    def test_stable(self) -> None:
        pairs = [Pair(f"q{i}", f"d{i}", group=None if i % 2 else f"g{i % 10}") for i in range(2000)]
        held = {p for p in pairs if is_held_out(p, 0.07)}
        assert 40 < len(held) < 250
        shuffled = pairs[:]
        random.Random(0).shuffle(shuffled)
        assert set(split(shuffled, 0.07, held=True)) == held
        assert set(split(pairs, 0.07, held=False)) == set(pairs) - held
        group = [p for p in pairs if p.group == "g0"]
        assert len({is_held_out(p, 0.5) for p in group}) == 1

    def test_known_value(self) -> None:
        # sha256 fixes the answer: it may never change between versions, processes or machines.
        assert [is_held_out(Pair("q", f"d{i}"), 0.5) for i in range(8)] == [True] * 6 + [False] * 2
        assert [is_held_out(Pair("q", "d", group=f"g{i}"), 0.5) for i in range(8)] == [
            False, True, True, False, False, False, False, True]


class TestPairFiles:
    """The user's .jsonl and .parquet pairs are read whole; anything wrong is one line."""

    def test_jsonl_and_parquet(self, tmp_path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [{"query": "q1", "document": "d1", "negatives": ["n1"], "group": 7},
                {"query": "q2", "document": "d2"}]
        _write(tmp_path / "data" / "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
        _write(tmp_path / "data" / "README.md", "not pairs: a directory walk leaves it alone")
        pq.write_table(pa.table({"query": ["q3", "q4"], "document": ["d3", "d4"], "negatives": [["n3", "n4"], None],
                                 "group": ["g", None], "other": [1, 2]}),
                       tmp_path / "data" / "b.parquet", row_group_size=1)
        pq.write_table(pa.table({"query": ["q5"], "document": ["d5"]}), tmp_path / "c.parquet")
        pairs = load_pairs([str(tmp_path / "data"), str(tmp_path / "*.parquet")])
        assert pairs == [Pair("q1", "d1", ("n1",), "7"), Pair("q2", "d2"), Pair("q3", "d3", ("n3", "n4"), "g"),
                         Pair("q4", "d4"), Pair("q5", "d5")]

    @pytest.mark.parametrize(("line", "says"), [
        ("not json", "line 2 of {} is not JSON"),
        ('["a list"]', "line 2 of {} is not a JSON object"),
        ('{"document": "d"}', 'line 2 of {} has no "query" string'),
        ('{"query": 3, "document": "d"}', 'line 2 of {} has no "query" string'),
        ('{"query": "q", "document": " "}', 'line 2 of {} has an empty "document"'),
        ('{"query": "q", "document": "d", "negatives": "n"}', 'line 2 of {} has "negatives" that are not'),
        ('{"query": "q", "document": "d", "negatives": [1]}', 'line 2 of {} has "negatives" that are not'),
        ('{"query": "q", "document": "d", "group": true}', 'line 2 of {} has a "group" that is neither'),
        ("[" * 100_000, "line 2 of {} nests deeper"),
    ])
    def test_bad_jsonl_line(self, tmp_path: Path, line: str, says: str) -> None:
        path = _write(tmp_path / "p.jsonl", '{"query": "q", "document": "d"}\n' + line + "\n")
        with pytest.raises(ConfigError) as err:
            load_pairs([str(path)])
        assert len(err.value.problems) == 1 and "\n" not in str(err.value)
        assert says.format(path) in str(err.value) and "twotower.pairs" in str(err.value)

    def test_bad_parquet(self, tmp_path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        cases = {
            "missing.parquet": ({"query": ["q"]}, 'has no "document" column'),
            "number.parquet": ({"query": [1], "document": ["d"]}, 'the "query" column'),
            "empty.parquet": ({"query": ["q", "q"], "document": ["d", ""]}, 'row 2 of {} has an empty "document"'),
            "null.parquet": ({"query": ["q", None], "document": ["d", "d"]}, 'row 2 of {} has no "query" string'),
        }
        for name, (columns, says) in cases.items():
            pq.write_table(pa.table(columns), tmp_path / name)
            with pytest.raises(ConfigError) as err:
                load_pairs([str(tmp_path / name)])
            assert len(err.value.problems) == 1 and says.format(tmp_path / name) in str(err.value), name
        _write(tmp_path / "fake.parquet", "not parquet")
        with pytest.raises(ConfigError, match="is not a readable parquet file"):
            load_pairs([str(tmp_path / "fake.parquet")])

    def test_repeated_value_over_the_bound(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A value repeated through a dictionary is counted as every row's copy, before decoding."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        import daemon.data.pairs.parquet as parquet

        monkeypatch.setattr(parquet, "MAX_ROW_GROUP_BYTES", 100_000)
        pq.write_table(pa.table({"query": ["q"] * 1000, "document": ["d" * 1000] * 1000}), tmp_path / "r.parquet")
        with pytest.raises(ConfigError, match=r"row group 1 of .* holds more than"):
            load_pairs([str(tmp_path / "r.parquet")])

    def test_refused_paths(self, tmp_path: Path) -> None:
        _write(tmp_path / "p.csv", "query,document\n")
        os.mkfifo(tmp_path / "fifo.jsonl")
        for entry, says in [(tmp_path / "p.csv", "unsupported file type .csv"), (tmp_path / "nope", "no such file"),
                            (tmp_path / "fifo.jsonl", "is a FIFO"), (tmp_path / "*.txt", "matches no file")]:
            with pytest.raises(ConfigError) as err:
                discover_pairs([str(entry)])
            assert len(err.value.problems) == 1 and says in str(err.value), entry
        with pytest.raises(ConfigError, match="names no file"):
            discover_pairs([])

    def test_walk_skips_fifo_links_and_other_files(self, tmp_path: Path) -> None:
        """A walk reads regular pair files only: a FIFO in the folder is refused before it is
        opened, and a symbolically linked directory is not entered."""
        _write(tmp_path / "outside" / "x.jsonl", '{"query": "q", "document": "d"}\n')
        folder = tmp_path / "data"
        _write(folder / "a.jsonl", '{"query": "q", "document": "d"}\n')
        (folder / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
        assert [s.key for s in discover_pairs([str(folder)])] == ["a.jsonl"]
        os.mkfifo(folder / "b.jsonl")
        with pytest.raises(ConfigError, match="is a FIFO"):
            discover_pairs([str(folder)])


class TestNumbering:
    def test_queries_and_negatives_per_document(self) -> None:
        from daemon.data.pairs.numbering import MAX_NEGATIVES_PER_DOCUMENT, number

        pairs = [Pair("q1", "doc a", ("neg x",), "g"), Pair("q2", "doc a", ("neg x", "neg y", "doc a"), "g"),
                 Pair("q1", "doc a", (), "g"),  # the same query again: kept once
                 Pair("q3", "doc b", ("neg x",), "g"),
                 Pair("q4", "doc c", tuple(f"n{k}" for k in range(40)), "g")]
        got = number(pairs, 1e-9, 10)  # nothing held out
        assert got.docs == ["doc a", "doc b", "doc c"] and got.pairs == 5
        assert got.queries == [["q1", "q2"], ["q3"], ["q4"]]
        # "neg x" is stored once for both documents naming it; a pair naming its own document is ignored.
        assert got.negative_texts[:2] == ["neg x", "neg y"]
        assert got.negatives[0] == [0, 1] and got.negatives[1] == [0]
        assert len(got.negatives[2]) == MAX_NEGATIVES_PER_DOCUMENT

    def test_idf_counts_documents_not_occurrences(self) -> None:
        import torch

        from daemon.data.pairs.tokens import idf_of

        docs = torch.tensor([[1, 1, 2, 0], [2, 3, 0, 0], [3, 3, 3, 4]])
        got = idf_of(docs, 6)
        df = torch.tensor([0, 1, 2, 2, 1, 0], dtype=torch.float64)
        want = torch.log1p((3 - df + 0.5) / (df + 0.5)).float()
        want[0] = 0.0
        assert torch.allclose(got, want)

    def test_content_keys_equal_exactly_for_equal_rows(self) -> None:
        import torch

        from daemon.tasks.twotower.mining_hook import content_keys

        rows = torch.tensor([[5, 6, 0], [5, 6, 0], [6, 5, 0], [5, 6, 1]])
        keys = content_keys(rows)
        assert keys[0] == keys[1] and len({int(keys[0]), int(keys[2]), int(keys[3])}) == 3
