"""The language model's data: corpus discovery and reading, the held-out split, the
tokenizer trained once, and the corpus prepared once and reused at restart."""

from __future__ import annotations

import json
import os
import resource
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from structlog.testing import capture_logs
from tokenizers import Tokenizer, models, pre_tokenizers

from daemon.config import ConfigError
from daemon.data.prepared.dataset import PreparedDataset, locate, reader_for
from daemon.data.text import corpus, tokenizer
from daemon.data.text.build import _prepared_corpus
from daemon.data.text.spec import TextSpec
from daemon.run.catalog import load_config
from daemon.tasks.causal_lm import text_spec
from daemon.tasks.causal_lm.config import LmConfig
from tests.conftest import LM_CORPUS, cli


def lm_cfg(*sets: str) -> TextSpec:
    """What the language model asks of the text source, from its config section."""
    cfg = load_config(sets=["lm.vocab_size=1024", "lm.eval_fraction=0.1", *sets], environ={})
    return text_spec(LmConfig.of(cfg))


def one_problem(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    (line,) = exc.value.problems
    return line


class TestCorpus:
    """Which documents, in which order, and the held-out split."""

    def test_the_default_is_the_standard_library(self) -> None:
        sources = corpus.discover([])
        keys = [s.key for s in sources]
        assert len(sources) > 500 and keys == sorted(keys)
        assert all(k.endswith(".py") for k in keys)
        assert not any("site-packages" in s.path.parts for s in sources)
        assert "json/decoder.py" in keys

    def test_directories_globs_and_files(self, tmp_path: Path) -> None:
        (tmp_path / "d" / "sub").mkdir(parents=True)
        (tmp_path / "d" / "b.md").write_text("# beta\n")
        (tmp_path / "d" / "sub" / "a.txt").write_text("alpha\n")
        (tmp_path / "d" / "notes.rst").write_text("skipped: not a supported type inside a directory\n")
        (tmp_path / "d" / ".hidden.txt").write_text("skipped: hidden\n")
        (tmp_path / "one.py").write_text("x = 1\n")
        found = corpus.discover([str(tmp_path / "d"), str(tmp_path / "*.py"), str(tmp_path / "d" / "b.md")])
        assert [s.key for s in found] == ["b.md", "sub/a.txt", "one.py"]  # b.md only once

    @pytest.mark.parametrize(
        ("entry", "expected"),
        [
            ("missing/dir", "no such file or directory"),
            ("*.nothing", "the pattern matches no file"),
            ("doc.pdf", "unsupported file type .pdf"),
        ],
    )
    def test_bad_entries_are_one_line(self, tmp_path: Path, entry: str, expected: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        (tmp_path / "doc.pdf").write_bytes(b"%PDF")
        with pytest.raises(ConfigError) as exc:
            corpus.discover([entry])
        line = one_problem(exc)
        assert line.startswith("config error: lm.corpus: ") and expected in line and line.endswith(f"(got '{entry}')")

    def test_an_empty_corpus(self, tmp_path: Path) -> None:
        (tmp_path / "only.rst").write_text("nothing we read\n")
        with pytest.raises(ConfigError) as exc:
            corpus.discover([str(tmp_path)])
        assert "lm.corpus: empty" in one_problem(exc)

    def test_jsonl_needs_text(self, tmp_path: Path) -> None:
        good = tmp_path / "good.jsonl"
        good.write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world", "id": 2}) + "\n")
        docs = list(corpus.documents(corpus.discover([str(good)])))
        assert [(d.key, d.text) for d in docs] == [("good.jsonl#1", "hello"), ("good.jsonl#3", "world")]
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
        with pytest.raises(ConfigError) as exc:
            list(corpus.documents(corpus.discover([str(bad)])))
        line = one_problem(exc)
        assert 'line 2 of' in line and 'has no "text" string field' in line and "(got ['body'])" in line

    def test_parquet_text_column(self, tmp_path: Path) -> None:
        path = tmp_path / "pages.parquet"
        pq.write_table(pa.table({"text": ["first page", None, "third page"], "url": ["a", "b", "c"]}), path)
        docs = list(corpus.documents(corpus.discover([str(path)])))
        assert [(d.key, d.text) for d in docs] == [("pages.parquet#1", "first page"), ("pages.parquet#3", "third page")]
        other = tmp_path / "other.parquet"
        pq.write_table(pa.table({"body": ["x"]}), other)
        with pytest.raises(ConfigError) as exc:
            list(corpus.documents(corpus.discover([str(other)])))
        assert 'has no "text" column' in one_problem(exc)

    def test_the_split_follows_the_key_not_the_order(self) -> None:
        sources = corpus.discover(LM_CORPUS)
        held = [d.key for d in corpus.split(sources, 0.1, held=True)]
        train = [d.key for d in corpus.split(list(reversed(sources)), 0.1, held=False)]
        assert held and train and not set(held) & set(train)
        assert len(held) + len(train) == len(list(corpus.documents(sources)))
        assert all(corpus.held_out(k, 0.1) for k in held)
        # About the fraction asked for, over many keys.
        share = np.mean([corpus.held_out(f"doc-{i}", 0.1) for i in range(20000)])
        assert 0.09 < share < 0.11


class TestTokenizer:
    """A byte-level BPE trained on the training split once, byte-identical for the same corpus."""

    def test_same_corpus_same_bytes_and_reused(self, tmp_path: Path) -> None:
        lm = lm_cfg()
        sources = corpus.discover(LM_CORPUS)
        with capture_logs() as logs:
            a = tokenizer.load_or_train(lm, sources, tmp_path / "a")
            tokenizer.load_or_train(lm, sources, tmp_path / "b")
            again = tokenizer.load_or_train(lm, sources, tmp_path / "a")
        events = [e["event"] for e in logs]
        assert events.count("tokenizer trained") == 2 and events.count("tokenizer reused") == 1
        assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
        assert len(a) == 1024 and a.eos_token == tokenizer.EOS
        text = "def f(x):\n    return x + 1  # é\n"
        assert a.decode(a.encode(text)) == text == again.decode(again.encode(text))

    def test_another_vocab_size_refuses_the_trained_one(self, tmp_path: Path) -> None:
        sources = corpus.discover(LM_CORPUS)
        tokenizer.load_or_train(lm_cfg(), sources, tmp_path)
        with pytest.raises(ConfigError) as exc:
            tokenizer.load_or_train(lm_cfg("lm.vocab_size=2048"), sources, tmp_path)
        assert one_problem(exc).startswith("config error: lm.vocab_size: the tokenizer in ")

    def test_a_named_tokenizer_file(self, tmp_path: Path) -> None:
        sources = corpus.discover(LM_CORPUS)
        tokenizer.load_or_train(lm_cfg(), sources, tmp_path / "trained")
        named = tokenizer.load_or_train(lm_cfg(f"lm.tokenizer={tmp_path / 'trained' / 'tokenizer.json'}"), sources,
                                        tmp_path / "unused")
        assert len(named) == 1024 and not (tmp_path / "unused").exists()


class TestPreparedCorpus:
    """The corpus is prepared once into the state directory; a restart reads its index back."""

    def _prepare(self, lm: TextSpec, state: Path) -> tuple[PreparedDataset, list[str]]:
        sources = corpus.discover(list(lm.corpus) or LM_CORPUS)
        tok = tokenizer.load_or_train(lm, sources, state / "lm")
        with capture_logs() as logs:
            loc = locate("lm.corpus", str(_prepared_corpus(lm, tok, state)))
        data = PreparedDataset(loc.index, reader_for(loc, state / "cache", 1 << 30), 32)
        return data, [e["event"] for e in logs]

    def test_written_once_then_reused(self, tmp_path: Path) -> None:
        lm = lm_cfg(f"lm.corpus={LM_CORPUS[0]}")
        first, events = self._prepare(lm, tmp_path)
        assert events == ["dataset prepared"]
        second, events = self._prepare(lm, tmp_path)
        assert events == ["prepared corpus reused"]
        assert first.index.digest == second.index.digest and first.index.dtype == "uint16"
        sources = corpus.discover(LM_CORPUS[:1])
        tok = tokenizer.load_or_train(lm, sources, tmp_path / "lm")
        # The held-out split's first document comes back from its tokens, then end-of-text.
        held = next(corpus.split(sources, lm.eval_fraction, held=True))
        ids = tok.encode(held.text)
        eval_tokens = second.reader.get(second.index.split("eval")[0])
        assert eval_tokens[: len(ids)].tolist() == ids and eval_tokens[len(ids)] == tok.eos_token_id
        docs = sum(1 for _ in corpus.documents(sources))
        tokens = sum(len(tok.encode(d.text)) + 1 for d in corpus.documents(sources))
        assert first.index.tokens("train") + first.index.tokens("eval") == tokens and docs > 10

    def test_an_added_file_is_appended_and_a_changed_one_prepares_again(self, tmp_path: Path) -> None:
        folder = tmp_path / "corpus"
        folder.mkdir()
        for i in range(3):
            (folder / f"{i}.txt").write_text(f"document {i} " * 400)
        lm = lm_cfg(f"lm.corpus={folder}")
        first, _ = self._prepare(lm, tmp_path / "state")
        (folder / "3.txt").write_text("one more document " * 300)
        second, events = self._prepare(lm, tmp_path / "state")
        assert events == ["dataset prepared"]
        assert second.index.shards[: len(first.index.shards)] == first.index.shards  # kept as they were
        assert len(second.index.shards) > len(first.index.shards)
        (folder / "0.txt").write_text("changed " * 100)
        third, events = self._prepare(lm, tmp_path / "state")
        assert "corpus files changed since they were prepared: preparing the corpus again" in events
        assert [s.key for s in third.index.sources] == sorted(str(p) for p in folder.iterdir())

    def test_a_bad_document_leaves_nothing_behind(self, tmp_path: Path) -> None:
        lm = lm_cfg()
        sources = corpus.discover(LM_CORPUS)
        tok = tokenizer.load_or_train(lm, sources, tmp_path / "lm")
        (tmp_path / "corpus").mkdir()
        (tmp_path / "corpus" / "a.txt").write_text("some text\n" * 50)
        (tmp_path / "corpus" / "b.jsonl").write_text('{"text": 3}\n')
        with pytest.raises(ConfigError):
            _prepared_corpus(lm_cfg(f"lm.corpus={tmp_path / 'corpus'}"), tok, tmp_path / "state")
        assert not (tmp_path / "state" / "data" / "lm-dataset").exists()

    def test_a_flipped_byte_is_caught_and_the_corpus_prepared_again(self, tmp_path: Path) -> None:
        from daemon.data.text.build import build

        lm = lm_cfg(f"lm.corpus={LM_CORPUS[0]}")
        built, _ = self._prepare(lm, tmp_path)
        shard = built.index.split("train")[0]
        path = tmp_path / "data" / "lm-dataset" / shard.name
        original = int(built.reader.get(shard)[500])
        data = bytearray(path.read_bytes())
        data[1001] ^= 0xFF  # same size: only the checksum sees it
        path.write_bytes(bytes(data))
        cfg = load_config(sets=["lm.vocab_size=1024", "lm.eval_fraction=0.1", f"lm.corpus={LM_CORPUS[0]}",
                                f"paths.state_dir={tmp_path}"], environ={})
        ctx = SimpleNamespace(cfg=cfg, launch=SimpleNamespace(is_main=True))
        with capture_logs() as logs:
            again = build(ctx, lm)  # type: ignore[arg-type]
        events = [e["event"] for e in logs]
        assert "the prepared corpus does not match its checksums; preparing it again" in events
        assert int(again.reader.get(again.location.index.split("train")[0])[500]) == original


def problem_of(call: Callable[[], object]) -> str:
    """The one config error line ``call()`` raises."""
    with pytest.raises(ConfigError) as exc:
        call()
    return one_problem(exc)


def read_all(*entries: str) -> list[corpus.Document]:
    return list(corpus.documents(corpus.discover(list(entries))))


class TestHostileCorpus:
    """A hostile corpus is one config line (exit 2 from `minerd`), caught before its bytes are read where it can be."""

    def test_a_link_to_dev_zero_is_refused_before_it_is_opened(self, tmp_path: Path) -> None:
        folder = tmp_path / "corpus"
        folder.mkdir()
        (folder / "a.txt").write_text("real text\n")
        (folder / "zero.txt").symlink_to("/dev/zero")
        expected = (f"config error: lm.corpus: {folder}/zero.txt is a character device (a link to /dev/zero), not a "
                    f"regular file: a corpus reads regular files only (got '{folder}')")
        assert problem_of(lambda: corpus.discover([str(folder)])) == expected
        code, out, err = cli("config", "validate", "--set", f"lm.corpus={folder}")
        assert (code, out, err) == (2, "", expected + "\n")
        # A FIFO is refused too (opening one for reading would wait for a writer forever).
        (folder / "zero.txt").unlink()
        os.mkfifo(folder / "pipe.md")
        assert f"{folder}/pipe.md is a FIFO, not a regular file" in problem_of(lambda: corpus.discover([str(folder)]))
        # A link to a regular file is read like the file.
        (folder / "pipe.md").unlink()
        (tmp_path / "elsewhere.txt").write_text("linked text\n")
        (folder / "link.txt").symlink_to(tmp_path / "elsewhere.txt")
        assert [(d.key, d.text) for d in read_all(str(folder))] == [("a.txt", "real text\n"),
                                                                     ("link.txt", "linked text\n")]

    def test_a_file_replaced_by_a_device_after_discovery_is_refused_when_read(self, tmp_path: Path) -> None:
        path = tmp_path / "doc.txt"
        path.write_text("text\n")
        sources = corpus.discover([str(path)])
        path.unlink()
        path.symlink_to("/dev/zero")
        line = problem_of(lambda: list(corpus.documents(sources)))
        assert line == (f"config error: lm.corpus: {path} is a character device (a link to /dev/zero), not a regular "
                        f"file: a corpus reads regular files only (got '{path}')")

    def test_a_deeply_nested_jsonl_line(self, tmp_path: Path) -> None:
        path = tmp_path / "deep.jsonl"
        path.write_text(json.dumps({"text": "fine"}) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
        shown = "[" * 60
        assert problem_of(lambda: read_all(str(path))) == (
            f"config error: lm.corpus: line 2 of {path} nests deeper than the JSON reader follows (got '{shown}')")

    @pytest.mark.timeout(60)
    def test_link_loops_end_a_recursive_glob_and_a_walk(self, tmp_path: Path) -> None:
        # Two links to "." make 2**40 paths for a glob that follows them: it would never end.
        root = tmp_path / "tree"
        (root / "sub").mkdir(parents=True)
        (root / "a.txt").write_text("alpha\n")
        (root / "sub" / "b.txt").write_text("beta\n")
        (root / "loop1").symlink_to(".")
        (root / "sub" / "loop2").symlink_to("..")
        assert [s.key for s in corpus.discover([f"{root}/**/*.txt"])] == ["a.txt", "b.txt"]
        assert [s.key for s in corpus.discover([str(root)])] == ["a.txt", "sub/b.txt"]
        assert [s.key for s in corpus.discover([f"{root}/**"])] == ["tree/a.txt", "tree/sub/b.txt"]
        # Linked directories inside a walk are not followed; one named in lm.corpus is.
        other = tmp_path / "other"
        other.mkdir()
        (other / "c.md").write_text("gamma\n")
        (root / "linked").symlink_to(other)
        assert [s.key for s in corpus.discover([str(root)])] == ["a.txt", "sub/b.txt"]
        assert [s.key for s in corpus.discover([str(root / "linked")])] == ["c.md"]
        assert [s.key for s in corpus.discover([f"{root}/*/*.md"])] == ["c.md"]

    def test_a_walk_stops_at_its_caps(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        for i in range(5):
            (tmp_path / f"{i}.txt").write_text(f"doc {i}\n")
        monkeypatch.setattr(corpus, "MAX_FILES", 4)
        line = problem_of(lambda: corpus.discover([str(tmp_path)]))
        assert line.startswith("config error: lm.corpus: more than 4 files; put small documents together in .jsonl")
        assert "more than 4 files" in problem_of(lambda: corpus.discover([f"{tmp_path}/*.txt"]))
        monkeypatch.setattr(corpus, "MAX_FILES", 100)
        monkeypatch.setattr(corpus, "MAX_WALK_NAMES", 3)
        line = problem_of(lambda: corpus.discover([f"{tmp_path}/**/*.txt"]))
        assert line.startswith("config error: lm.corpus: the walk looked at more than 3 names")

    def test_documents_over_the_cap(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(corpus, "MAX_DOCUMENT_BYTES", 1000)
        big = tmp_path / "big.md"
        big.write_text("x" * 1001)
        # A text file: from its size, at discovery (minerd config validate), before it is read.
        assert problem_of(lambda: corpus.discover([str(big)])) == (
            f"config error: lm.corpus: {big} is 1001 bytes, over the 1000 bytes a document may hold; split it (or "
            f"put its parts in a .jsonl file, a document per line) (got '{big}')")
        lines = tmp_path / "lines.jsonl"
        lines.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "y" * 2000}) + "\n")
        assert problem_of(lambda: read_all(str(lines))) == (
            f"config error: lm.corpus: line 2 of {lines} is longer than the 1000 bytes a document may hold "
            f"(got '{lines}')")
        rows = tmp_path / "rows.parquet"
        pq.write_table(pa.table({"text": ["a", None, "é" * 600]}), rows)  # 1,200 UTF-8 bytes in 600 characters
        assert problem_of(lambda: read_all(str(rows))) == (
            f"config error: lm.corpus: row 3 of {rows} holds 1.2 KiB of text, over the 1000 bytes a document may "
            f"hold (got '{rows}')")

    def test_a_zstd_parquet_bomb_is_refused_before_it_is_decoded(self, tmp_path: Path) -> None:
        # 1,300 rows of one 1 MB string: under 1 KB on disk, 1.3 GB of text once decoded. Its
        # metadata says about 1 MB (the string is stored once, in the column's dictionary).
        path = tmp_path / "bomb.parquet"
        text = pa.DictionaryArray.from_arrays(pa.array(np.zeros(1300, dtype=np.int32)), pa.array(["x" * 1_000_000]))
        pq.write_table(pa.table({"text": text}), path, compression="zstd")
        assert path.stat().st_size < 10_000
        assert pq.ParquetFile(path).metadata.row_group(0).column(0).total_uncompressed_size < 2_000_000
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        line = problem_of(lambda: read_all(str(path)))
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # ru_maxrss: KB on Linux
        assert line.startswith(f"config error: lm.corpus: row group 1 of {path} holds more than 256.0 MiB of text "
                               f"once decoded (")
        assert line.endswith(f"over what a row group may hold (got '{path}')")
        assert grown_mb < 200, grown_mb  # decoding it would take 1.3 GB (and at least 1 GB past any earlier peak)

    def test_a_row_group_over_the_cap_is_refused_from_its_metadata(self, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
        path = tmp_path / "plain.parquet"
        texts = [f"{i:08d} " + "w" * 40_000 for i in range(64)]  # 2.5 MB, distinct rows: stored plain
        pq.write_table(pa.table({"text": texts}), path, compression="zstd", use_dictionary=False)
        chunk = pq.ParquetFile(path).metadata.row_group(0).column(0)
        # Garbage over every data page, the footer intact: reading a page now fails, so a
        # refusal that names the size was decided from the metadata alone.
        data = bytearray(path.read_bytes())
        start = chunk.data_page_offset
        data[start + 8: start + chunk.total_compressed_size] = b"\xff" * (chunk.total_compressed_size - 8)
        path.write_bytes(bytes(data))
        monkeypatch.setattr(corpus, "MAX_ROW_GROUP_BYTES", 1 << 20)
        line = problem_of(lambda: read_all(str(path)))
        assert line.startswith(f"config error: lm.corpus: row group 1 of {path} holds 2.4 MiB of text uncompressed "
                               f"in 64 rows, over the 1.0 MiB or ")
        assert "write the file with smaller row groups" in line
        monkeypatch.setattr(corpus, "MAX_ROW_GROUP_BYTES", 256 << 20)  # under the cap, its pages are read: broken
        assert problem_of(lambda: read_all(str(path))).startswith(
            f"config error: lm.corpus: row group 1 of {path} cannot be read: ")

    @pytest.mark.parametrize(
        ("name", "content", "expected"),
        [
            ("bad.jsonl", b'{"text": "a"}\n{"text": "b",}\n', "line 2 of {path} is not JSON (Expecting property name"),
            ("latin1.jsonl", b'{"text": "a"}\n{"text": "\xe9"}\n', "line 2 of {path} is not JSON ("),
            ("list.jsonl", b'["text"]\n', "line 1 of {path} has no \"text\" string field (got 'list')"),
            ("junk.parquet", b"not a parquet file at all", "{path} is not a readable parquet file: "),
        ],
    )
    def test_parse_errors_name_the_file_and_the_line(self, tmp_path: Path, name: str, content: bytes,
                                                     expected: str) -> None:
        path = tmp_path / name
        path.write_bytes(content)
        line = problem_of(lambda: read_all(str(path)))
        assert line.startswith("config error: lm.corpus: " + expected.format(path=path)), line

    def test_a_truncated_parquet_and_a_non_string_column(self, tmp_path: Path) -> None:
        path = tmp_path / "cut.parquet"
        pq.write_table(pa.table({"text": ["some text"] * 100}), path)
        path.write_bytes(path.read_bytes()[:-20])
        assert f"{path} is not a readable parquet file: " in problem_of(lambda: read_all(str(path)))
        numbers = tmp_path / "numbers.parquet"
        pq.write_table(pa.table({"text": [1, 2, 3]}), numbers)
        assert problem_of(lambda: read_all(str(numbers))) == (
            f"config error: lm.corpus: the \"text\" column of {numbers} is not a string column (got 'int64')")

    def test_lone_surrogates_become_replacement_characters(self, tmp_path: Path) -> None:
        # JSON may escape half a surrogate pair; the tokenizer cannot take the str it makes.
        path = tmp_path / "half.jsonl"
        path.write_text('{"text": "a\\ud800b"}\n')
        (doc,) = read_all(str(path))
        assert doc.text == "a\ufffd\ufffd\ufffdb"
        doc.text.encode("utf-8")


def tokenizer_file(path: Path, vocab: dict[str, int], added: tuple[str, ...] = ()) -> Path:
    """A word-level tokenizer.json with exactly ``vocab``'s ids (holes allowed) and ``added`` tokens."""
    tok = Tokenizer(models.WordLevel(vocab, unk_token=next(iter(vocab))))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(added))
    tok.save(str(path))
    return path


class TestNamedTokenizerIds:
    """A named tokenizer that can produce an id the model has no embedding row for is refused at start, in one line."""

    def test_a_vocabulary_with_a_hole(self, tmp_path: Path) -> None:
        path = tokenizer_file(tmp_path / "gap.json", {"<unk>": 0, "a": 1, "b": 5000}, added=("<eos>",))
        expected = ("config error: lm.tokenizer: the tokenizer can produce token id 5000, but the model has 4 "
                    "embedding rows (one per token of the tokenizer, which has 4): every id must be below 4 (got ")
        code, _, err = cli("config", "validate", "--set", f"lm.tokenizer={path}")
        assert code == 2 and err.startswith(expected) and len(err.splitlines()) == 1, err
        line = problem_of(lambda: tokenizer.load_or_train(lm_cfg(f"lm.tokenizer={path}"), [], tmp_path / "lm"))
        assert line.startswith(expected)

    def test_added_tokens_past_a_models_rows(self, tmp_path: Path) -> None:
        model = tmp_path / "model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8,
                                                       "max_position_embeddings": 1024}))
        (model / "model.safetensors").write_bytes(b"")  # validate looks for the file, not in it
        words = {f"w{i}": i for i in range(8)}
        tokenizer_file(model / "tokenizer.json", words, added=("<extra>",))  # id 8: past the 8 rows
        code, _, err = cli("config", "validate", "--set", f"lm.init_from={model}")
        assert (code, err) == (2, "config error: lm.init_from: the tokenizer can produce token id 8, but the model has "
                                  "8 embedding rows (the vocab_size of lm.init_from's config.json): every id must be "
                                  f"below 8 (got '{model}')\n")
        line = problem_of(lambda: tokenizer.load_or_train(lm_cfg(f"lm.init_from={model}"), [], tmp_path / "lm"))
        assert "can produce token id 8, but the model has 8 embedding rows" in line
        tokenizer_file(model / "tokenizer.json", words)  # ids 0..7: fits
        assert cli("config", "validate", "--set", f"lm.init_from={model}")[0] == 0

    def test_code_in_a_tokenizer_directory_never_runs(self, tmp_path: Path) -> None:
        folder = tmp_path / "tok"
        folder.mkdir()
        marker = tmp_path / "ran"
        (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}, "tokenizer_class": "EvilTokenizer"}))
        tokenizer_file(folder / "tokenizer.json", {"<unk>": 0, "a": 1})
        expected = "its tokenizer_config.json names code to run (auto_map); minerd never runs code from a directory"
        code, _, err = cli("config", "validate", "--set", f"lm.tokenizer={folder}")
        assert code == 2 and f"config error: lm.tokenizer: {expected}" in err and len(err.splitlines()) == 1
        line = problem_of(lambda: tokenizer.load_or_train(lm_cfg(f"lm.tokenizer={folder}"), [], tmp_path / "lm"))
        assert line.startswith(f"config error: lm.tokenizer: {expected}")
        assert not marker.exists()

    def test_a_broken_tokenizer_file_is_one_line(self, tmp_path: Path) -> None:
        path = tmp_path / "tokenizer.json"
        path.write_text("[" * 50_000 + "]" * 50_000)
        code, _, err = cli("config", "validate", "--set", f"lm.tokenizer={path}")
        assert code == 2 and err.startswith("config error: lm.tokenizer: cannot load a tokenizer from it: ")
        line = problem_of(lambda: tokenizer.load_or_train(lm_cfg(f"lm.tokenizer={path}"), [], tmp_path / "lm"))
        assert line.startswith("config error: lm.tokenizer: cannot load a tokenizer from it: ")
