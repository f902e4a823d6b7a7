"""Prepared datasets in one process: the replayable order, prepare (resumed, appended, the
same for any number of workers), the index as untrusted input, and the shard cache (bound,
verification on arrival, a corrupt shard fetched again)."""

from __future__ import annotations

import errno
import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from daemon.config import ConfigError
from daemon.data.prepared.cache import ShardCache, ShardRefused
from daemon.data.prepared.dataset import PreparedDataset, locate
from daemon.data.prepared.index import INDEX, Index
from daemon.data.prepared.order import DatasetOrder, Permutation
from daemon.data.prepared.prepare import Stale, Tok, prepare
from daemon.data.prepared.record import DataRecord, ids_digest, sample_ids
from daemon.data.text import corpus
from daemon.data.text.build import tok_spec
from daemon.data.text.tokenizer import train_bpe, wrap
from daemon.run.local import cpu_run
from daemon.storage import LocalStorage
from tests.conftest import LM_CORPUS

SOURCES = LM_CORPUS[2:]  # the json package: a few files, tens of thousands of tokens


@pytest.fixture(scope="module")
def tok() -> Tok:
    docs = corpus.split(corpus.discover(SOURCES), 0.2, held=False)
    return tok_spec(wrap(train_bpe((d.text for d in docs), 1024)), 0.2)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


class TestOrder:
    @pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
    def test_a_permutation_is_a_bijection_replayed_from_its_key(self, n: int) -> None:
        out = Permutation(n, "digest", 7, 1)(np.arange(n))
        assert sorted(out.tolist()) == list(range(n))
        assert np.array_equal(out, Permutation(n, "digest", 7, 1)(np.arange(n)))
        if n > 16:
            assert not np.array_equal(out, Permutation(n, "digest", 8, 1)(np.arange(n)))
            assert not np.array_equal(out, np.arange(n))

    def test_replicas_and_ranks_train_disjoint_sequences(self) -> None:
        sequences = [300, 5, 0, 211, 97]
        orders = {(r, k): DatasetOrder("d" * 64, 3, sequences, 8, k, 2, r, 2) for r in range(2) for k in range(2)}
        first = orders[(0, 0)]
        assert first.batches_per_epoch == sum(sequences) // 32
        for epoch in (1, 2):
            seen: list[int] = []
            for index in range(first.batches_per_epoch):
                for order in orders.values():
                    seen += order.batch(epoch, index).tolist()
            # every slot of every batch: no sequence twice in an epoch, all of them but the last partial batch
            assert len(seen) == len(set(seen)) == first.batches_per_epoch * 32
            assert set(seen) <= set(range(sum(sequences)))
        # a fresh process (here: fresh objects) replays the same ids
        again = DatasetOrder("d" * 64, 3, sequences, 8, 1, 2, 1, 2)
        assert again.batch(2, 5).tolist() == orders[(1, 1)].batch(2, 5).tolist()
        assert orders[(0, 0)].batch(1, 0).tolist() != orders[(0, 0)].batch(2, 0).tolist()

    def test_without_a_count_each_replica_has_its_own_order(self) -> None:
        a, b = (DatasetOrder("d" * 64, 3, [100, 100], 4, replica=r) for r in (0, 1))
        ids_a = np.concatenate([a.batch(1, i).numpy() for i in range(a.batches_per_epoch)])
        ids_b = np.concatenate([b.batch(1, i).numpy() for i in range(b.batches_per_epoch)])
        assert sorted(ids_a) == sorted(ids_b) == list(range(200)) and not np.array_equal(ids_a, ids_b)

    def test_the_walk_stays_in_one_shard_at_a_time(self) -> None:
        order = DatasetOrder("d" * 64, 1, [50, 50, 50, 50], 5)
        shard_of = [set(order.shard_of(order.batch(1, i).numpy()).tolist()) for i in range(40)]
        assert all(len(s) == 1 for s in shard_of)  # 50 sequences a shard, 10 batches each
        walk = [next(iter(s)) for s in shard_of[::10]]
        assert sorted(walk) == [0, 1, 2, 3]
        assert order.shards_ahead(1, 0, 2) == walk[1:3]


class TestPrepare:
    def test_any_number_of_interruptions_gives_the_same_shards(self, tmp_path: Path, tok: Tok) -> None:
        straight, _ = prepare(SOURCES, str(tmp_path / "a"), tok, shard_tokens=1500)
        assert len(straight.split("train")) > 3 and straight.split("eval")

        done = 0

        def stop_after_two(_: object) -> None:
            nonlocal done
            done += 1
            if done % 2 == 0:
                raise KeyboardInterrupt  # Ctrl-C, or a kill, right after a shard is complete

        runs = 0
        while True:
            runs += 1
            try:
                prepare(SOURCES, str(tmp_path / "b"), tok, shard_tokens=1500, on_shard=stop_after_two)
                break
            except KeyboardInterrupt:
                assert not (tmp_path / "b" / INDEX).exists()
        assert runs > 3
        assert files(tmp_path / "a") == files(tmp_path / "b")

    def test_appending_keeps_every_finished_shard(self, tmp_path: Path, tok: Tok) -> None:
        first, _ = prepare([f"{SOURCES[0]}/decoder.py"], str(tmp_path / "d"), tok,
                           shard_tokens=2000)
        before = files(tmp_path / "d")
        again, written = prepare([f"{SOURCES[0]}/decoder.py"], str(tmp_path / "d"), tok, shard_tokens=2000)
        assert written == 0 and again.digest == first.digest
        grown, written = prepare(SOURCES, str(tmp_path / "d"), tok, shard_tokens=2000)
        after = files(tmp_path / "d")
        assert written > 0 and grown.shards[: len(first.shards)] == first.shards
        assert all(after[name] == data for name, data in before.items() if name.endswith(".tokens"))
        for shard in grown.shards:
            assert hashlib.sha256(after[shard.name]).hexdigest() == shard.sha256

    def test_a_changed_source_is_named(self, tmp_path: Path, tok: Tok) -> None:
        (tmp_path / "src").mkdir()
        doc = tmp_path / "src" / "a.txt"
        doc.write_text("words " * 2000)
        prepare([str(tmp_path / "src")], str(tmp_path / "d"), tok, shard_tokens=2000)
        doc.write_text("other words " * 2000)
        with pytest.raises(Stale) as exc:
            prepare([str(tmp_path / "src")], str(tmp_path / "d"), tok, shard_tokens=2000)
        assert exc.value.changed == [str(doc)]

    def test_another_tokenizer_is_refused(self, tmp_path: Path, tok: Tok) -> None:
        prepare(SOURCES, str(tmp_path / "d"), tok, shard_tokens=50_000)
        other = Tok(tok.json.replace('"<|endoftext|>"', '"<|end|>"', 1), tok.eos, tok.dtype, tok.eval_fraction)
        with pytest.raises(ConfigError) as exc:
            prepare(SOURCES, str(tmp_path / "d"), other)
        assert exc.value.problems[0].startswith("config error: --out: holds a dataset made with another tokenizer")


def _index(tmp_path: Path, tok: Tok) -> tuple[Path, dict[str, object]]:
    prepare(SOURCES, str(tmp_path / "d"), tok, shard_tokens=20_000)
    return tmp_path / "d", json.loads((tmp_path / "d" / INDEX).read_text())


class TestHostileIndex:
    @pytest.mark.parametrize(("edit", "expected"), [
        (lambda i: "not json {", "is not JSON"),
        (lambda i: {**i, "format": 9}, "format '9' is not 1"),
        (lambda i: {**i, "shards": [{**i["shards"][0], "name": "../../etc/passwd"}]}, "shard 0: name is not"),
        (lambda i: {**i, "shards": [{**i["shards"][0], "bytes": 12}]}, "has 12 bytes for"),
        (lambda i: {**i, "shards": [i["shards"][0], i["shards"][0]]}, "is named twice"),
        (lambda i: {**i, "dtype": "float64"}, "dtype must be one of"),
        (lambda i: {**i, "shards": [{**i["shards"][0], "tokens": 10**15}]}, "tokens must be a whole number"),
        (lambda i: [i] * 5, "is not a JSON object"),
        (lambda i: "[" * 100_000, "is not JSON"),
    ])
    def test_one_line_naming_the_key(self, tmp_path: Path, tok: Tok, edit, expected: str) -> None:
        folder, index = _index(tmp_path, tok)
        bad = edit(index)
        (folder / INDEX).write_text(bad if isinstance(bad, str) else json.dumps(bad))
        with pytest.raises(ConfigError) as exc:
            locate("lm.dataset", str(folder))
        (line,) = exc.value.problems
        assert line.startswith("config error: lm.dataset: its index.json is not a dataset index"), line
        assert expected in line, line

    def test_an_index_over_its_size_is_not_read(self, tmp_path: Path, tok: Tok, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
        import daemon.data.prepared.index as index_module

        folder, _ = _index(tmp_path, tok)
        monkeypatch.setattr(index_module, "MAX_INDEX_BYTES", 100)
        with pytest.raises(ConfigError) as exc:
            locate("lm.dataset", str(folder))
        assert "over the 100" in exc.value.problems[0]

    def test_a_tokenizer_the_index_does_not_name(self, tmp_path: Path, tok: Tok) -> None:
        folder, _ = _index(tmp_path, tok)
        (folder / "tokenizer.json").write_text(tok.json.replace("<|endoftext|>", "<|end|>"))
        with pytest.raises(ConfigError) as exc:
            locate("lm.dataset", str(folder))
        assert exc.value.problems == ["config error: lm.dataset: its tokenizer.json is not the one the index "
                                      f"names (got {str(folder)!r})"]


class Flaky(LocalStorage):
    """A bucket whose first answer for each shard is corrupt (``always``: every answer), and
    which reports the cache's size on disk at every fetch."""

    def __init__(self, root: Path, cache: Path, always: bool = False) -> None:
        super().__init__(root)
        self.cache, self.always, self.seen, self.sizes = cache, always, set[str](), []

    def fetch(self, key: str, dest: Path | None, max_bytes: int) -> tuple[int, str] | None:
        self.sizes.append(sum(p.stat().st_size for p in self.cache.iterdir() if not p.name.startswith(".")))
        got = super().fetch(key, dest, max_bytes)
        if dest is not None and (self.always or key not in self.seen):
            self.seen.add(key)
            data = bytearray(dest.read_bytes())
            data[0] ^= 1
            dest.write_bytes(bytes(data))
            return len(data), hashlib.sha256(data).hexdigest()
        return got


class TestShardCache:
    def _dataset(self, tmp_path: Path, tok: Tok) -> Index:
        index, _ = prepare(SOURCES, str(tmp_path / "d"), tok, shard_tokens=4000)
        return index

    def test_bounded_verified_and_a_corrupt_shard_fetched_again(self, tmp_path: Path, tok: Tok) -> None:
        index = self._dataset(tmp_path, tok)
        (tmp_path / "cache").mkdir()
        store = Flaky(tmp_path / "d", tmp_path / "cache")
        bound = 2 * max(s.bytes for s in index.shards)
        cache = ShardCache(store, index, tmp_path / "cache", bound)
        data = PreparedDataset(index, cache, 32)
        order = DatasetOrder(index.digest, 1, data.sequences, 4)
        with capture_logs() as logs:
            for i in range(order.batches_per_epoch):
                data.prefetch(order.shards_ahead(1, i, 1))
                rows = data.rows(order.batch(1, i).numpy())
                assert rows.shape == (4, 33)
        cache.close()
        assert max(store.sizes) <= bound and cache.cached()[1] <= bound
        assert cache.stats.refetches == len(index.split("train"))  # each one's first copy was refused
        assert sum("fetching it again" in e["event"] for e in logs) == cache.stats.refetches
        # What the cache kept is what the index says.
        for path in (tmp_path / "cache").iterdir():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == next(
                s.sha256 for s in index.shards if s.name == path.name)

    def test_a_shard_wrong_twice_is_refused(self, tmp_path: Path, tok: Tok) -> None:
        index = self._dataset(tmp_path, tok)
        (tmp_path / "cache").mkdir()
        cache = ShardCache(Flaky(tmp_path / "d", tmp_path / "cache", always=True), index, tmp_path / "cache", 1 << 30)
        with pytest.raises(ShardRefused) as exc:
            cache.get(index.shards[0])
        assert "does not match its sha256 in the index, twice; refused" in str(exc.value)
        assert not any((tmp_path / "cache").iterdir())
        cache.close()

    def test_a_restart_reuses_verified_shards_without_fetching(self, tmp_path: Path, tok: Tok) -> None:
        index = self._dataset(tmp_path, tok)
        (tmp_path / "cache").mkdir()
        first = ShardCache(LocalStorage(tmp_path / "d"), index, tmp_path / "cache", 1 << 30)
        for shard in index.shards[:3]:
            first.get(shard)
        first.close()
        (tmp_path / "cache" / ".x.part").write_bytes(b"partial")
        store = Flaky(tmp_path / "d", tmp_path / "cache")
        second = ShardCache(store, index, tmp_path / "cache", 1 << 30)
        assert second.cached() == (3, sum(s.bytes for s in index.shards[:3]))
        second.get(index.shards[1])
        assert store.sizes == [] and not (tmp_path / "cache" / ".x.part").exists()
        second.close()

    def test_a_full_disk_shrinks_the_cache_and_the_read_goes_on(self, tmp_path: Path, tok: Tok,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
        import daemon.data.prepared.cache as cache_module

        monkeypatch.setattr(cache_module.time, "sleep", lambda s: None)
        index = self._dataset(tmp_path, tok)
        full = {"left": 1}

        class Full(LocalStorage):
            def fetch(self, key: str, dest: Path | None, max_bytes: int) -> tuple[int, str] | None:
                if full["left"] and key == index.shards[3].name:
                    full["left"] -= 1
                    raise OSError(errno.ENOSPC, "No space left on device")
                return super().fetch(key, dest, max_bytes)

        largest = max(s.bytes for s in index.shards)
        cache = ShardCache(Full(tmp_path / "d"), index, tmp_path / "cache", 10 * largest)
        for shard in index.shards[:3]:
            cache.get(shard)
        with capture_logs() as logs:
            got = cache.get(index.shards[3])
        assert len(got) == index.shards[3].tokens
        (line,) = [e["event"] for e in logs if e["event"].startswith("DISK FULL")]
        assert f"the shard cache at {tmp_path / 'cache'} cannot grow" in line
        assert cache.max_bytes < 10 * largest and cache.cached()[1] <= cache.max_bytes
        cache.close()

    def test_prefetch_runs_beside_the_reader(self, tmp_path: Path, tok: Tok) -> None:
        index = self._dataset(tmp_path, tok)
        gate = threading.Event()

        class Slow(LocalStorage):
            def fetch(self, key: str, dest: Path | None, max_bytes: int) -> tuple[int, str] | None:
                gate.wait(10)
                return super().fetch(key, dest, max_bytes)

        cache = ShardCache(Slow(tmp_path / "d"), index, tmp_path / "cache", 1 << 30)
        cache.prefetch(index.shards[1:2])
        assert cache.cached() == (0, 0)
        gate.set()
        cache.get(index.shards[1])
        assert cache.cached()[0] == 1
        cache.close()


class TestTraining:
    def test_the_trainer_trains_what_data_sample_replays(self, tmp_path: Path, tok: Tok) -> None:
        prepare(SOURCES, str(tmp_path / "d"), tok, shard_tokens=8000)
        run = cpu_run([f"paths.state_dir={tmp_path / 's'}", "train.task=causal_lm", f"lm.dataset={tmp_path / 'd'}",
                       "lm.seq_len=32", "train.batch_size=4", "train.effective_batch_size=8",
                       "train.inner_steps_per_outer=3", "lm.eval_sequences=4", "upload.enabled=false",
                       "train.seed=11", "lm.vocab_size=1024"]).run
        seen: list[np.ndarray] = []
        real = run.task.get_batch

        def spy(idx, device, pos):  # type: ignore[no-untyped-def]
            seen.append(idx.numpy().copy())
            return real(idx, device, pos)

        run.task.get_batch = spy  # type: ignore[method-assign]
        for _ in range(6):
            run.trainer.inner_step()
        index = locate("lm.dataset", str(tmp_path / "d")).index
        for window in (0, 1):
            replayed = sample_ids(index, 11, 32, 4, 1, 0, 0, 0, 6, window)
            assert np.array_equal(np.concatenate(seen[6 * window: 6 * window + 6]), replayed)
        # What a revision published now says it trained on: the last window's ids, by digest.
        record = DataRecord(index, 11, 32, 4, 1, 0, 0, 2, 3)(6)
        assert record["dataset"] == index.digest and record["windows"] == [0, 1]
        assert record["last_window_sample_ids_sha256"] == [ids_digest(np.concatenate(seen[6:12]))]
