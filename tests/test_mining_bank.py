"""The memory bank: newest rows, sampling without positives, snapshots."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from daemon.tasks.twotower.mining import MemoryBank

torch.set_num_threads(1)


class TestUpdateAndGather:
    """Rows hold the newest embedding written for each id, from numpy or torch."""

    def test_newest_row_wins_and_torch_is_accepted(self) -> None:
        bank = MemoryBank(10, 4)
        bank.update(np.array([1, 2]), np.ones((2, 4), dtype=np.float32))
        bank.update(torch.tensor([2]), torch.full((1, 4), 3.0, requires_grad=True))
        got = bank.gather(np.array([[1, 2]]))
        assert got.shape == (1, 2, 4)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got[0, 0], np.ones(4))
        np.testing.assert_array_equal(got[0, 1], np.full(4, 3.0))
        assert bank.filled_count == 2

    def test_state_dict_round_trip(self) -> None:
        bank = MemoryBank(6, 3)
        bank.update([0, 5], np.arange(6, dtype=np.float32).reshape(2, 3))
        other = MemoryBank(6, 3)
        other.load_state_dict(bank.state_dict())
        np.testing.assert_array_equal(other.gather([0, 5]), bank.gather([0, 5]))
        assert other.filled_count == 2
        with pytest.raises(ValueError, match="shape"):
            MemoryBank(7, 3).load_state_dict(bank.state_dict())


class TestSample:
    """Fallback sampling is uniform over written rows and never returns a row's own positives."""

    def test_never_returns_excluded_ids(self) -> None:
        bank = MemoryBank(20, 2)
        bank.update(np.arange(20), np.zeros((20, 2), dtype=np.float32))
        rng = np.random.default_rng(0)
        exclude = np.stack([np.arange(16), (np.arange(16) + 1) % 20], axis=1)  # [16, 2]
        for _ in range(50):
            out = bank.sample(rng, exclude, 12)
            assert out.shape == (16, 12)
            assert not (out[:, :, None] == exclude[:, None, :]).any()

    def test_only_written_rows_are_sampled(self) -> None:
        bank = MemoryBank(1000, 2)
        written = np.array([3, 7, 500, 999])
        bank.update(written, np.ones((4, 2), dtype=np.float32))
        out = bank.sample(np.random.default_rng(1), np.array([[3], [7]]), 200)
        assert set(out.ravel().tolist()) <= {500, 999, 3, 7}
        assert not (out[0] == 3).any() and not (out[1] == 7).any()
        bank.update([42], np.ones((1, 2), dtype=np.float32))  # the cached pool is refreshed
        out = bank.sample(np.random.default_rng(2), np.array([[3]]), 500)
        assert 42 in out

    def test_too_few_documents_is_an_error(self) -> None:
        bank = MemoryBank(10, 2)
        bank.update([4], np.ones((1, 2), dtype=np.float32))
        with pytest.raises(ValueError, match="too few"):
            bank.sample(np.random.default_rng(0), np.array([[4]]), 3)


class TestSnapshot:
    """A snapshot holds every written row, consistent row by row while the trainer writes."""

    def test_snapshot_under_concurrent_updates(self) -> None:
        n, dim = 40_000, 8
        bank = MemoryBank(n, dim)
        bank.update(np.arange(n), np.zeros((n, dim), dtype=np.float32))
        stop = threading.Event()

        def writer() -> None:
            value = 0.0
            rng = np.random.default_rng(0)
            while not stop.is_set():
                value += 1.0
                ids = rng.integers(0, n, 256)
                bank.update(ids, np.full((256, dim), value, dtype=np.float32))

        t = threading.Thread(target=writer)
        t.start()
        try:
            for _ in range(5):
                ids, vecs = bank.snapshot()
                assert len(ids) == n
                # each row is one write: all its components are equal
                assert (vecs == vecs[:, :1]).all()
        finally:
            stop.set()
            t.join()
