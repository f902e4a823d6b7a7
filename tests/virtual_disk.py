"""A small disk for the disk-full scenarios: a real tmpfs as root, a fault-injecting layer otherwise.

Mounting a tmpfs needs root (CI runs as root). Without it, the miner runs under this
module instead of ``python -m daemon``: before minerd is imported, it wraps minerd's
own write seams (``daemon.atomic``, ``daemon.disk.save_safetensors``, the embedding
chunk writer) and its free-space probe, so that the folder stands for a file system of
a given capacity: the bytes of every file under it count against the capacity, a write
that takes it over the capacity fails with ENOSPC after its temporary file is removed,
and ``free_bytes`` reports what is left. Writes outside minerd's seams (a library
writing on its own) are not limited, so the tmpfs stays the stronger test.

Run as ``python -m tests.virtual_disk run --set ...`` with ``MINERD_VIRTUAL_DISK`` set to
``<folder>:<capacity in bytes>``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ENV = "MINERD_VIRTUAL_DISK"


def used_bytes(root: Path) -> int:
    """Bytes the files under ``root`` take, each rounded up to a 4 KiB page as tmpfs does."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += -(-os.stat(os.path.join(folder, name)).st_size // 4096) * 4096
    return total


@dataclass
class SmallDisk:
    """What a test needs of the small disk: its folder, its free bytes, how to start a miner on it."""

    path: Path
    kind: str  # "tmpfs" or "virtual"
    capacity: int
    env: dict[str, str] = field(default_factory=dict)
    module: str = "daemon"

    def free(self) -> int:
        if self.kind == "virtual":
            return max(0, self.capacity - used_bytes(self.path))
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize


@contextlib.contextmanager
def small_disk(path: Path, megabytes: int, kind: str) -> Iterator[SmallDisk]:
    """A file system of ``megabytes`` at ``path``: a tmpfs (unmounted afterwards, by its path)
    or the virtual one."""
    path.mkdir(parents=True, exist_ok=True)
    capacity = megabytes << 20
    if kind == "virtual":
        yield SmallDisk(path, kind, capacity, {ENV: f"{path}:{capacity}"}, "tests.virtual_disk")
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield SmallDisk(path, kind, capacity)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def install(root: Path, capacity: int) -> None:
    """Wrap minerd's write seams and free-space probe (before the rest of minerd is imported)."""
    from daemon import atomic, disk
    from daemon.tasks.twotower.embeddings import chunkfile

    root = root.resolve()

    def under(path: str | os.PathLike[str]) -> bool:
        return Path(os.path.abspath(path)).is_relative_to(root)

    def check(path: str | os.PathLike[str]) -> None:
        if under(path) and used_bytes(root) > capacity:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    real_free = disk.free_bytes

    def free_bytes(path: Path) -> int | None:
        return max(0, capacity - used_bytes(root)) if under(path) else real_free(path)

    real_open = atomic.atomic_open

    @contextlib.contextmanager
    def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
        with real_open(path, mode) as fh:  # a raise in here removes the temporary file
            yield fh
            fh.flush()
            check(path)

    real_with = atomic.write_with

    def write_with(path: str | os.PathLike[str], writer: Callable[[str], None]) -> None:
        def checked(tmp: str) -> None:
            writer(tmp)
            check(tmp)

        real_with(path, checked)

    real_save = disk.save_safetensors

    def save_safetensors(tensors: Any, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        real_save(tensors, path, metadata)
        try:
            check(path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise

    real_chunk = chunkfile.write_chunk

    def write_chunk(path: Path, index: int, generation: int, rows: Any) -> None:
        check_after = used_bytes(root) + chunkfile.chunk_file_size(rows.shape[0], rows.shape[1])
        if under(path) and check_after > capacity:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_chunk(path, index, generation, rows)

    disk.free_bytes = free_bytes
    atomic.atomic_open = atomic_open
    atomic.write_with = write_with
    disk.save_safetensors = save_safetensors
    chunkfile.write_chunk = write_chunk


def main() -> None:
    folder, _, capacity = os.environ[ENV].rpartition(":")
    install(Path(folder), int(capacity))
    from daemon.cli import main as cli_main  # imported after the seams are wrapped

    cli_main(sys.argv[1:])


if __name__ == "__main__":
    main()
