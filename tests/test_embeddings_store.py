"""The tiered trainable embedding store: behaves exactly like an array, bounded, checked on disk."""

from __future__ import annotations

import json
import shutil
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from prometheus_client import CollectorRegistry

from daemon.tasks.twotower.config import EmbeddingsConfig
from daemon.tasks.twotower.embeddings import (
    EmbeddingStore,
    EmbeddingStoreCorrupt,
    SparseRowAdam,
    TrainableEmbeddingManager,
    apply_sparse_sgd,
)

torch.set_num_threads(1)
MB = 1024 * 1024


def mb_for(chunks: int, chunk_size: int, dim: int) -> float:
    """Tier size in MB that holds exactly ``chunks`` chunks (exact in binary floating point)."""
    return chunks * chunk_size * dim * 4 / MB


def disk_store(path: Path, n: int = 1000, d: int = 8, cs: int = 16, l1: int = 2, l2: int = 3, **kw: Any):
    return EmbeddingStore(
        n, d, "disk", path, chunk_size=cs,
        cache_l1_size_mb=mb_for(l1, cs, d), cache_l2_size_mb=mb_for(l2, cs, d), **kw,
    )  # fmt: skip


class StoreVersusArray(RuleBasedStateMachine):
    """Under random gets, updates, syncs, checkpoints, closes, crashes and restores with tiny
    tiers, the disk store returns exactly what a numpy array model returns."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="emb-prop-"))
        self.store: EmbeddingStore | None = None

    @initialize(
        n=st.integers(8, 60),
        d=st.integers(1, 4),
        cs=st.integers(1, 6),
        l1=st.integers(0, 3),
        l2=st.integers(0, 3),
        sync_every=st.integers(1, 5),
        auto=st.booleans(),
        l3=st.sampled_from([True, True, True, False]),
        init=st.sampled_from(["normal", "zeros"]),
    )
    def setup(self, n: int, d: int, cs: int, l1: int, l2: int, sync_every: int, auto: bool, l3: bool,
              init: str) -> None:  # fmt: skip
        if not l3:
            l2 = -(-n // cs)  # the whole table must fit when there is no disk tier to fall back to
        self.kw = dict(
            num_rows=n, embedding_dim=d, storage_mode="disk", embeddings_dir=self.dir, chunk_size=cs,
            cache_l1_size_mb=mb_for(l1, cs, d), cache_l2_size_mb=mb_for(l2, cs, d),
            enable_l3_cache=l3, sync_batch_size=sync_every, auto_sync=auto, init=init, seed=11,
        )  # fmt: skip
        self.n, self.d, self.sync_every, self.auto0 = n, d, sync_every, auto
        self.store = EmbeddingStore(**self.kw)
        memory = EmbeddingStore(**{**self.kw, "storage_mode": "memory"})
        self.model = memory.get_embeddings(np.arange(n)).numpy().copy()
        self.synced = self.model.copy()
        self.pins: list[tuple[int, np.ndarray]] = []
        self.auto = auto
        self.since_sync = 0
        self.rng = np.random.default_rng(0)

    def ids(self, data: st.DataObject) -> np.ndarray:
        return np.array(data.draw(st.lists(st.integers(0, self.n - 1), max_size=30)), dtype=np.int64)

    @rule(data=st.data(), as_tensor=st.booleans())
    def get(self, data: st.DataObject, as_tensor: bool) -> None:
        assert self.store is not None
        ids = self.ids(data)
        got = self.store.get_embeddings(torch.from_numpy(ids) if as_tensor else ids)
        assert got.dtype == torch.float32 and tuple(got.shape) == (len(ids), self.d)
        np.testing.assert_array_equal(got.numpy(), self.model[ids])

    @rule(data=st.data())
    def update(self, data: st.DataObject) -> None:
        assert self.store is not None
        ids = self.ids(data)
        values = self.rng.standard_normal((len(ids), self.d)).astype(np.float32)
        self.store.update_embeddings(ids, values)
        for i, row in zip(ids.tolist(), values, strict=True):  # the model: last occurrence wins
            self.model[i] = row
        self.since_sync += 1
        if self.auto and self.since_sync >= self.sync_every:
            self.mark_synced()

    def mark_synced(self) -> None:
        self.synced = self.model.copy()
        self.since_sync = 0

    @rule(flag=st.booleans())
    def set_auto_sync(self, flag: bool) -> None:
        assert self.store is not None
        self.store.enable_auto_sync(flag)
        self.auto = flag

    @rule()
    def sync(self) -> None:
        assert self.store is not None
        self.store.force_sync_all_chunks()
        self.mark_synced()

    @rule()
    def checkpoint(self) -> None:
        assert self.store is not None
        state = self.store.checkpoint_state()
        self.mark_synced()
        self.pins = [*self.pins, (state["generation"], self.model.copy())][-3:]

    def reopen(self, **kw: Any) -> None:
        self.store = EmbeddingStore(**{**self.kw, **kw})
        self.auto = self.auto0
        self.since_sync = 0

    @rule()
    def close_and_reopen(self) -> None:
        assert self.store is not None
        self.store.close()
        self.mark_synced()
        self.reopen()

    @rule()
    def crash_and_reopen(self) -> None:
        """The old object is abandoned without close, as a killed process would leave it."""
        self.model = self.synced.copy()
        self.reopen()

    @precondition(lambda self: bool(self.pins))
    @rule(data=st.data())
    def crash_and_restore_checkpoint(self, data: st.DataObject) -> None:
        generation, table = data.draw(st.sampled_from(self.pins))
        self.model = table.copy()
        self.synced = table.copy()
        self.reopen(generation=generation)

    @invariant()
    def tiers_within_bounds(self) -> None:
        if self.store is not None:
            b = self.store.tier_bytes()
            assert b["l1"] + b["l2"] <= self.store.memory_bound_bytes()

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


TestStoreVersusArray = StoreVersusArray.TestCase
TestStoreVersusArray.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip


class TestSemantics:
    """Reads, writes and initial values follow the documented rules."""

    def test_memory_and_disk_start_from_the_same_seeded_table(self, tmp_path: Path) -> None:
        mem = EmbeddingStore(100, 5, "memory", chunk_size=7, seed=4)
        disk = disk_store(tmp_path, n=100, d=5, cs=7, seed=4)
        a = mem.get_embeddings(np.arange(100))
        assert torch.equal(a, disk.get_embeddings(np.arange(100)))
        assert 0.005 < float(a.std()) < 0.02
        other = EmbeddingStore(100, 5, "memory", chunk_size=7, seed=5)
        assert not torch.equal(a, other.get_embeddings(np.arange(100)))
        zeros = EmbeddingStore(100, 5, "memory", init="zeros")
        assert float(zeros.get_embeddings(np.arange(100)).abs().sum()) == 0.0

    @pytest.mark.parametrize("mode", ["memory", "disk"])
    def test_duplicate_ids_in_an_update_last_wins(self, tmp_path: Path, mode: str) -> None:
        store = EmbeddingStore(50, 2, mode, tmp_path, chunk_size=8)  # type: ignore[arg-type]
        ids = np.array([3, 9, 3, 3, 9], dtype=np.int64)
        vals = np.arange(10, dtype=np.float32).reshape(5, 2)
        store.update_embeddings(torch.from_numpy(ids), torch.from_numpy(vals))
        got = store.get_embeddings(np.array([3, 9, 3]))
        np.testing.assert_array_equal(got.numpy(), vals[[3, 4, 3]])

    def test_get_returns_a_leaf_that_takes_gradients(self, tmp_path: Path) -> None:
        store = disk_store(tmp_path)
        e = store.get_embeddings(np.array([1, 2]), requires_grad=True)
        assert e.is_leaf and e.requires_grad
        e.sum().backward()
        assert e.grad is not None

    def test_bad_input_is_refused_with_a_clear_error(self, tmp_path: Path) -> None:
        store = disk_store(tmp_path, n=10)
        with pytest.raises(IndexError, match="out of range"):
            store.get_embeddings(np.array([10]))
        with pytest.raises(ValueError, match="shape"):
            store.update_embeddings(np.array([1]), np.zeros((1, 3), np.float32))
        store.close()
        with pytest.raises(ValueError, match="created with"):
            disk_store(tmp_path, n=11)
        with pytest.raises(RuntimeError, match="closed"):
            store.get_embeddings(np.array([1]))

    def test_sample_ids_map_to_rows(self, tmp_path: Path) -> None:
        sample_ids = np.array([900, 5, 77, 1234], dtype=np.int64)
        store = TrainableEmbeddingManager(
            sample_ids=sample_ids, embedding_dim=3, storage_mode="disk", embeddings_dir=tmp_path,
            chunk_size=2, init="zeros",
        )  # fmt: skip
        store.update_embeddings(np.array([77, 1234]), np.ones((2, 3), np.float32))
        np.testing.assert_array_equal(store.get_embeddings(np.array([5, 77])).numpy()[:, 0], [0, 1])
        assert store.row_index(np.array([77])).tolist() == [2]
        with pytest.raises(KeyError, match="unknown sample id 6"):
            store.get_embeddings(np.array([6]))
        store.close()
        with pytest.raises(ValueError, match="different sample_ids"):
            EmbeddingStore(sample_ids=sample_ids[::-1], embedding_dim=3, storage_mode="disk",
                           embeddings_dir=tmp_path, chunk_size=2)  # fmt: skip

    def test_without_l3_the_table_must_fit_the_memory_tiers(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="enable_l3=false"):
            disk_store(tmp_path, n=1000, cs=16, l1=2, l2=3, enable_l3_cache=False)

    def test_from_config_puts_files_under_the_state_dir(self, tmp_path: Path) -> None:
        cfg = EmbeddingsConfig(storage_mode="disk", chunk_size=32, cache_l1_mb=1, cache_l2_mb=1)
        store = EmbeddingStore.from_config(cfg, num_rows=100, dim=4, state_dir=tmp_path, registry=None)
        store.update_embeddings(np.array([1]), np.ones((1, 4), np.float32))
        store.close()
        assert any(p.name.startswith("chunk-") for p in (tmp_path / "embeddings").iterdir())


class TestSyncPolicy:
    """Dirty chunks reach disk every sync_batch_size updates, or only on request when auto sync is off."""

    def test_auto_sync_every_n_updates(self, tmp_path: Path) -> None:
        store = disk_store(tmp_path, l1=100, l2=0, sync_batch_size=4)
        for i in range(11):
            store.update_embeddings(np.array([i]), np.ones((1, 8), np.float32))
        assert store.get_cache_performance()["disk_syncs"] == 2
        assert store.get_cache_performance()["dirty_chunks"] == 1

    def test_a_full_disk_keeps_the_rows_dirty_and_says_so(self, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
        """An automatic sync that finds the disk full reports it and goes on; the rows stay dirty
        in memory and the next sync that finds room writes them."""
        import errno

        from daemon.tasks.twotower.embeddings import chunkfile

        reports: list[tuple[str, Path]] = []
        store = disk_store(tmp_path, l1=100, l2=0, sync_batch_size=2,
                           on_disk_full=lambda what, path, exc: reports.append((what, path)))
        real = chunkfile.write_chunk

        def full(*args: Any, **kw: Any) -> None:  # our own seam: the chunk writer
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(chunkfile, "write_chunk", full)
        for i in range(4):
            store.update_embeddings(np.array([i]), np.full((1, 8), float(i), np.float32))
        assert [what for what, _ in reports] == ["embedding chunks", "embedding chunks"]
        assert store.get_cache_performance()["dirty_chunks"] >= 1
        monkeypatch.setattr(chunkfile, "write_chunk", real)
        store.force_sync_all_chunks()
        assert store.get_cache_performance()["dirty_chunks"] == 0
        reopened = disk_store(tmp_path, l1=100, l2=0, generation=store.generation)
        assert torch.equal(reopened.get_embeddings(torch.arange(4)), torch.arange(4.0)[:, None].expand(4, 8))

    def test_manual_sync_only_when_auto_sync_is_off(self, tmp_path: Path) -> None:
        store = disk_store(tmp_path, l1=100, l2=0, sync_batch_size=1)
        store.enable_auto_sync(False)
        for i in range(20):
            store.update_embeddings(np.array([i]), np.ones((1, 8), np.float32))
        assert store.get_cache_performance()["disk_syncs"] == 0
        g = store.force_sync_all_chunks()
        assert store.get_cache_performance()["disk_syncs"] == 1
        assert store.force_sync_all_chunks() == g  # nothing dirty: no new generation


class TestCheckpoint:
    """checkpoint_state() pins a generation the trainer can come back to."""

    def test_restore_a_pinned_generation_after_more_training(self, tmp_path: Path) -> None:
        store = disk_store(tmp_path, sync_batch_size=1)
        ids = np.arange(0, 1000, 7)
        store.update_embeddings(ids, np.full((len(ids), 8), 1.0, np.float32))
        state = store.checkpoint_state()
        store.update_embeddings(ids, np.full((len(ids), 8), 2.0, np.float32))
        store.close()
        assert float(disk_store(tmp_path).get_embeddings(ids).mean()) == 2.0
        restored = disk_store(tmp_path, generation=state["generation"])
        assert float(restored.get_embeddings(ids).mean()) == 1.0
        restored.close()
        assert float(disk_store(tmp_path).get_embeddings(ids).mean()) == 1.0  # restored is now newest

    def test_load_checkpoint_state_in_place(self, tmp_path: Path) -> None:
        store = disk_store(tmp_path, l1=1, l2=1, sync_batch_size=2)
        ids = np.arange(0, 1000, 3)
        store.update_embeddings(ids, np.full((len(ids), 8), 1.0, np.float32))
        state = store.checkpoint_state()
        for _ in range(3):
            store.update_embeddings(ids, np.full((len(ids), 8), 2.0, np.float32))
        store.load_checkpoint_state(state)
        assert float(store.get_embeddings(ids).mean()) == 1.0
        store.update_embeddings(ids[:5], np.full((5, 8), 3.0, np.float32))
        store.close()
        again = disk_store(tmp_path).get_embeddings(ids).numpy()
        assert (again[:5] == 3.0).all() and (again[5:] == 1.0).all()

    def test_memory_mode_checkpoint_carries_the_table(self) -> None:
        store = EmbeddingStore(20, 3, "memory")
        state = store.checkpoint_state()
        store.update_embeddings(np.array([0]), np.ones((1, 3), np.float32))
        store.load_checkpoint_state(state)
        assert torch.equal(store.get_embeddings(np.arange(20)), state["table"])

    def test_unpinned_files_are_removed(self, tmp_path: Path) -> None:
        store = disk_store(tmp_path, sync_batch_size=1, keep_checkpoints=2)
        for k in range(6):
            store.update_embeddings(np.arange(1000), np.full((1000, 8), k, np.float32))
            store.checkpoint_state()
        store.close()
        chunks = [p for p in tmp_path.iterdir() if p.name.startswith("chunk-")]
        manifests = [p for p in tmp_path.iterdir() if p.name.startswith("manifest-")]
        assert len(manifests) == 2 and len(chunks) == 2 * store.num_chunks


class TestSparseOptimisers:
    """The sparse update rules match torch's dense optimisers on the same rows."""

    def test_sgd_with_duplicate_ids_matches_dense_autograd(self, tmp_path: Path) -> None:
        store = disk_store(tmp_path, n=40, d=4, cs=8, l1=1, l2=1)
        dense = store.get_embeddings(np.arange(40)).clone().requires_grad_(True)
        ids = np.array([1, 5, 1, 39, 5, 1])
        target = torch.randn(6, 4)
        e = store.get_embeddings(ids, requires_grad=True)
        ((e - target) ** 2).sum().backward()
        apply_sparse_sgd(store, ids, e, lr=0.1)
        ((dense[torch.from_numpy(ids)] - target) ** 2).sum().backward()
        with torch.no_grad():
            assert dense.grad is not None
            dense -= 0.1 * dense.grad
        torch.testing.assert_close(store.get_embeddings(np.arange(40)), dense.detach())

    def test_row_adam_matches_torch_adam_when_all_rows_move(self) -> None:
        store = EmbeddingStore(12, 3, "memory", seed=2)
        dense = torch.nn.Parameter(store.get_embeddings(np.arange(12)).clone())
        opt = torch.optim.Adam([dense], lr=0.01)
        adam = SparseRowAdam(store, lr=0.01)
        for step in range(4):
            ids = np.concatenate([np.random.default_rng(step).permutation(12), [3, 3]])
            target = torch.randn(len(ids), 3, generator=torch.Generator().manual_seed(step))
            e = store.get_embeddings(ids, requires_grad=True)
            ((e - target) ** 2).sum().backward()
            adam.step(ids, e)
            opt.zero_grad()
            ((dense[torch.from_numpy(ids)] - target) ** 2).sum().backward()
            opt.step()
        torch.testing.assert_close(store.get_embeddings(np.arange(12)), dense.detach())
        adam2 = SparseRowAdam(store)
        adam2.load_state_dict(adam.state_dict())
        assert torch.equal(adam2.exp_avg_sq, adam.exp_avg_sq) and adam2.lr == 0.01


class TestMemoryBound:
    """Memory stays within the tier sizes plus the stated overhead under adversarial access."""

    def test_sweeps_strides_and_random_access_stay_bounded(self, tmp_path: Path) -> None:
        n, d, cs = 65536, 64, 1024  # a 16 MiB table in 64 chunks; L1 + L2 = 6 chunks = 1.5 MiB
        numpy_only = [tracemalloc.DomainFilter(inclusive=True, domain=np.lib.tracemalloc_domain)]
        # The interpreter's own tables (the interned-string dict...) may grow by a few MiB
        # during any call; far less than the 16 MiB a store caching the whole table would hold.
        interpreter_slack = 4 * MB
        rng = np.random.default_rng(1)
        tracemalloc.start(1)
        try:
            store = disk_store(tmp_path, n=n, d=d, cs=cs, l1=2, l2=4, sync_batch_size=3)
            assert store.memory_bound_bytes() < 6 * cs * d * 4 + 32 * 1024
            patterns = [
                lambda i: np.arange(i * 2000, i * 2000 + 2000) % n,  # sequential sweep
                lambda i: rng.integers(0, n, 1000),  # uniform random
                lambda i: np.arange(i % cs, n, cs),  # one id in every chunk: 64 chunks a call
                lambda i: rng.integers(0, n, 300) // cs * cs,  # first row of random chunks
            ]
            for i in range(len(patterns)):  # first use of numpy/json paths imports modules: not ours
                store.get_embeddings(patterns[i](i))
            store.checkpoint_state()
            base, _ = tracemalloc.get_traced_memory()
            base_numpy = tracemalloc.take_snapshot().filter_traces(numpy_only)
            for i in range(16):
                ids = patterns[i % len(patterns)](i)
                tracemalloc.reset_peak()
                store.get_embeddings(ids)
                store.update_embeddings(ids, np.ones((len(ids), d), np.float32))
                _, peak = tracemalloc.get_traced_memory()
                per_call = len(ids) * (3 * d * 4 + 128) + interpreter_slack
                assert peak - base <= per_call, (i, peak - base, per_call)
                del ids
                held = tracemalloc.take_snapshot().filter_traces(numpy_only)
                grown = sum(stat.size_diff for stat in held.compare_to(base_numpy, "filename"))
                assert grown <= 4096, (i, grown)  # no numpy array outlives a call
                b = store.tier_bytes()
                assert b["l1"] <= 2 * cs * d * 4 and b["l1"] + b["l2"] <= 6 * cs * d * 4
            assert store.get_cache_performance()["evictions"] > 200
            store.close()
        finally:
            tracemalloc.stop()


class TestCorruption:
    """A truncated, corrupt or missing file is reported with its name."""

    def make(self, tmp_path: Path) -> list[Path]:
        store = disk_store(tmp_path, n=100, cs=16)
        store.update_embeddings(np.arange(100), np.ones((100, 8), np.float32))
        store.close()
        return sorted(tmp_path.glob("chunk-*.emb"))

    def test_truncated_chunk_detected_on_open(self, tmp_path: Path) -> None:
        victim = self.make(tmp_path)[2]
        victim.write_bytes(victim.read_bytes()[:-7])
        with pytest.raises(EmbeddingStoreCorrupt, match=f"{victim}.*truncated"):
            disk_store(tmp_path, n=100, cs=16)

    def test_flipped_byte_detected_on_read(self, tmp_path: Path) -> None:
        victim = self.make(tmp_path)[3]
        raw = bytearray(victim.read_bytes())
        raw[100] ^= 0x40
        victim.write_bytes(bytes(raw))
        store = disk_store(tmp_path, n=100, cs=16)
        store.get_embeddings(np.arange(0, 16))
        for _ in range(2):  # the store stays consistent: the other chunks still read right
            with pytest.raises(EmbeddingStoreCorrupt, match=f"{victim}.*checksum"):
                store.get_embeddings(np.arange(48, 50))
            np.testing.assert_array_equal(store.get_embeddings(np.arange(100) % 48).numpy(), 1.0)

    def test_missing_chunk_and_bad_manifest(self, tmp_path: Path) -> None:
        files = self.make(tmp_path)
        files[0].unlink()
        with pytest.raises(EmbeddingStoreCorrupt, match=f"{files[0]} is missing"):
            disk_store(tmp_path, n=100, cs=16)
        manifest = next(tmp_path.glob("manifest-*.json"))
        manifest.write_text("{not json")
        with pytest.raises(EmbeddingStoreCorrupt, match=str(manifest)):
            disk_store(tmp_path, n=100, cs=16)


class TestMetrics:
    """The store exports the docs/METRICS.md metrics on the injected registry."""

    def test_metric_names_labels_and_values(self, tmp_path: Path) -> None:
        registry = CollectorRegistry()
        store = disk_store(tmp_path, n=160, cs=16, l1=2, l2=2, sync_batch_size=2, registry=registry)
        store.get_embeddings(np.arange(0, 16))  # chunk 0 from L3 (never written: an L3 miss)
        store.get_embeddings(np.arange(0, 16))  # L2 hit, promoted
        store.get_embeddings(np.arange(0, 16))  # L1 hit
        for _ in range(2):
            store.update_embeddings(np.arange(16, 32), np.ones((16, 8), np.float32))
        v = registry.get_sample_value
        name = "minerd_embedding_cache_requests_total"
        assert v(name, {"tier": "l1", "result": "hit"}) == 16
        assert v(name, {"tier": "l1", "result": "miss"}) == 32
        assert v(name, {"tier": "l2", "result": "hit"}) == 16
        assert v(name, {"tier": "l2", "result": "miss"}) == 16
        assert v(name, {"tier": "l3", "result": "hit"}) == 0
        assert v(name, {"tier": "l3", "result": "miss"}) == 16
        assert v("minerd_embedding_cache_bytes", {"tier": "l1"}) == 2 * 16 * 8 * 4  # chunks 0 and 1
        assert v("minerd_embedding_cache_bytes", {"tier": "l2"}) == 0
        assert v("minerd_embedding_disk_syncs_total") == 1
        assert store.get_cache_performance()["cache_hit_rate"] == pytest.approx(2 / 3)
        assert "hit rate 66.7%" in store.cache_log_line()
        assert json.loads(json.dumps(store.status()))["disk_syncs"] == 1
        store.close()
        assert v("minerd_embedding_disk_syncs_total") is None  # unregistered on close
        disk_store(tmp_path, n=160, cs=16, registry=registry).close()
