"""Crash safety of the disk store under a real kill -9 in the middle of syncing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from daemon.tasks.twotower.embeddings import EmbeddingStore, chunkfile

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
N, D, CS = 16384, 32, 256  # 64 chunks of 32 KiB: a sync writes 64 files, each fsynced

# The child sets every row to k, syncs, reports k, and goes on with k + 1 until killed.
CHILD = """
import sys
import numpy as np
import torch
torch.set_num_threads(1)
from daemon.tasks.twotower.embeddings import EmbeddingStore
n, d, cs, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
store = EmbeddingStore(n, d, "disk", path, chunk_size=cs, cache_l1_size_mb=64, cache_l2_size_mb=0,
                       auto_sync=False, init="zeros")
k = int(store.get_embeddings(np.array([0])).numpy()[0, 0])
ids = np.arange(n)
print("ready", k, flush=True)
while True:
    k += 1
    store.update_embeddings(ids, np.full((n, d), k, np.float32))
    store.force_sync_all_chunks()
    print("synced", k, flush=True)
"""


def open_store(path: Path) -> EmbeddingStore:
    return EmbeddingStore(N, D, "disk", path, chunk_size=CS, cache_l1_size_mb=64, cache_l2_size_mb=0)


@pytest.mark.integration
@pytest.mark.slow
class TestKillDuringSync:
    """After kill -9 mid-sync every chunk file is whole and the store reopens at one synced state."""

    def test_kill_9_while_syncing(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(0)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        in_flight = 0
        for round_ in range(3):
            # 1. Start a writer and let it complete at least two syncs.
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(N), str(D), str(CS), str(tmp_path)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT,
            )  # fmt: skip
            assert child.stdout is not None
            synced: list[int] = []
            try:
                while len(synced) < 2:  # other lines are the store's own log (structlog's default)
                    line = child.stdout.readline()
                    assert line, "writer died before syncing"
                    if line.startswith("synced "):
                        synced.append(int(line.split()[1]))
                # 2. Kill it by its pid at a random moment of a later sync (syncs are ~all of its time).
                time.sleep(float(rng.uniform(0.0, 0.05)))
                os.kill(child.pid, signal.SIGKILL)
            finally:
                child.kill()
                rest = child.communicate()[0]
            synced += [int(m) for m in re.findall(r"^synced (\d+)$", rest, re.M)]
            assert child.returncode == -signal.SIGKILL

            newest = max(int(m.group(1)) for p in tmp_path.iterdir() if (m := chunkfile.MANIFEST_RE.match(p.name)))
            pending = [p for p in tmp_path.glob("chunk-*.emb") if f"-g{newest:08d}" not in p.name
                       and int(p.name.split("-g")[1].split(".")[0]) > newest]  # fmt: skip
            in_flight += bool(pending or list(tmp_path.glob(".*.tmp")))

            # 3. Every chunk file on disk is whole: a right size, a good checksum, one value.
            for path in tmp_path.glob("chunk-*.emb"):
                m = chunkfile.CHUNK_RE.match(path.name)
                assert m is not None
                c, g = int(m.group(1)), int(m.group(2))
                rows = np.empty((CS, D), np.float32)
                chunkfile.read_chunk_into(path, c, g, rows)
                assert np.unique(rows).size == 1, f"{path} mixes rows of two syncs"

            # 4. The store reopens at the last sync the writer reported, or the one it was
            # committing when it died; the whole table holds one k.
            store = open_store(tmp_path)
            table = store.get_embeddings(np.arange(N)).numpy()
            values = np.unique(table)
            assert values.size == 1, f"round {round_}: table mixes syncs {values[:5]}"
            assert int(values[0]) in (synced[-1], synced[-1] + 1), (values[0], synced[-3:])
            assert not list(tmp_path.glob(".*.tmp")), "temp files of the killed sync are cleaned up"
            store.close()
        assert in_flight >= 1, "no kill landed inside a sync: the test proved nothing"
