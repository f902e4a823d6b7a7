"""The language model's data: corpus discovery and reading, the held-out split, the
tokenizer trained once, and the token cache reused at restart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from structlog.testing import capture_logs

from daemon.config import ConfigError
from daemon.data.text import corpus, tokenizer, tokens
from daemon.data.text.spec import TextSpec
from daemon.run.catalog import load_config
from daemon.tasks.causal_lm import text_spec
from daemon.tasks.causal_lm.config import LmConfig
from tests.conftest import LM_CORPUS


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


class TestTokenCache:
    """The corpus is tokenised once; a restart reads the cache back."""

    def test_written_once_then_reused(self, tmp_path: Path) -> None:
        lm = lm_cfg()
        sources = corpus.discover(LM_CORPUS)
        tok = tokenizer.load_or_train(lm, sources, tmp_path / "lm")
        with capture_logs() as logs:
            first = tokens.load_or_build(sources, tok, lm, tmp_path / "data")
            second = tokens.load_or_build(sources, tok, lm, tmp_path / "data")
        events = [e["event"] for e in logs]
        assert events == ["tokenising the corpus", "token cache written", "token cache reused"]
        assert first.train.dtype == np.uint16 and np.array_equal(first.train, second.train)
        assert np.array_equal(first.eval, second.eval)
        # The held-out split's first document comes back from its tokens, then end-of-text.
        held = next(corpus.split(sources, lm.eval_fraction, held=True))
        ids = tok.encode(held.text)
        assert first.eval[: len(ids)].tolist() == ids and first.eval[len(ids)] == tok.eos_token_id
        assert first.manifest["eval_docs"] + first.manifest["train_docs"] == len(list(corpus.documents(sources)))

    def test_a_cache_without_its_manifest_is_rebuilt(self, tmp_path: Path) -> None:
        lm = lm_cfg()
        sources = corpus.discover(LM_CORPUS)
        tok = tokenizer.load_or_train(lm, sources, tmp_path / "lm")
        built = tokens.load_or_build(sources, tok, lm, tmp_path / "data")
        (built.folder / tokens.MANIFEST).unlink()  # a kill before the manifest was written
        with (built.folder / "train.tokens").open("r+b") as fh:
            fh.truncate(100)
        with capture_logs() as logs:
            again = tokens.load_or_build(sources, tok, lm, tmp_path / "data")
        assert "token cache written" in [e["event"] for e in logs]
        assert again.train.size == built.manifest["train_tokens"]

    def test_a_bad_document_leaves_nothing_behind(self, tmp_path: Path) -> None:
        lm = lm_cfg()
        good = tmp_path / "corpus" / "a.txt"
        good.parent.mkdir()
        good.write_text("some text\n" * 50)
        sources = corpus.discover(LM_CORPUS)
        tok = tokenizer.load_or_train(lm, sources, tmp_path / "lm")
        bad = tmp_path / "corpus" / "b.jsonl"
        bad.write_text('{"text": 3}\n')
        with pytest.raises(ConfigError):
            tokens.load_or_build(corpus.discover([str(tmp_path / "corpus")]), tok, lm, tmp_path / "data")
        assert not (tmp_path / "data").exists()

    def test_a_flipped_byte_is_caught_and_the_cache_rebuilt(self, tmp_path: Path) -> None:
        lm = lm_cfg()
        sources = corpus.discover(LM_CORPUS)
        tok = tokenizer.load_or_train(lm, sources, tmp_path / "lm")
        built = tokens.load_or_build(sources, tok, lm, tmp_path / "data")
        path = built.folder / "train.tokens"
        original = int(built.train[500])
        data = bytearray(path.read_bytes())
        data[1001] ^= 0xFF  # same size: only the checksum sees it
        path.write_bytes(bytes(data))
        with capture_logs() as logs:
            again = tokens.load_or_build(sources, tok, lm, tmp_path / "data")
        events = [e["event"] for e in logs]
        assert "token cache does not match its checksum; tokenising again" in events
        assert "token cache written" in events and int(again.train[500]) == original
