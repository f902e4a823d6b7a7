"""Upload benchmark: what publishing a revision costs the training step.

Builds an MLP of realistic size (about 67M parameters full, 17M quick), trains
it on random data in this process, and compares blocks of steps with the
uploader publishing back to back (every step allowed, so one revision is
always in flight) against blocks without any upload, interleaved so that load
from other processes hits both alike. Also times a publish on its own against
a raw copy (with fsync) of the same bytes.

RESULT keys: step_time_ratio (mean step with publishing / without; goal <=
1.10), throughput_over_copy (publish bytes/s over copy bytes/s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from daemon.config import UploadConfig
from daemon.upload import Uploader, verify_target


def _mlp(width: int, layers: int) -> torch.nn.Sequential:
    mods: list[torch.nn.Module] = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*mods[:-1])


def _copy_seconds(files: list[Path], dst_dir: Path) -> float:
    t0 = time.perf_counter()
    for src in files:
        dst = dst_dir / src.name
        shutil.copyfile(src, dst)
        with open(dst, "rb") as fh:
            os.fsync(fh.fileno())
    return time.perf_counter() - t0


def main(quick: bool) -> None:
    width, layers = (2048, 4) if quick else (4096, 4)
    batch, rounds, block = (32, 3, 4) if quick else (64, 4, 6)
    cores = os.cpu_count() or 1
    # Leave a core to the publisher, as a GPU miner leaves its CPU mostly free.
    torch.set_num_threads(max(1, cores - 1))
    torch.manual_seed(0)
    model = _mlp(width, layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, width), torch.randn(batch, width)
    params = sum(p.numel() for p in model.parameters())

    def train_step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    with tempfile.TemporaryDirectory(prefix="minerd-bench-upload-") as tmp:
        registry = CollectorRegistry()
        cfg = UploadConfig(min_inner_step=0, every_inner_steps=1, keep=2, min_interval_seconds=0)
        up = Uploader.from_config(cfg, tmp, registry, config_hash="bench")
        up.start()
        for _ in range(2):  # warm-up: allocator, first snapshot buffers
            train_step()
        up.on_inner_step(0, 0, train_step(), model, opt)
        up.wait_idle(600)

        plain: list[float] = []
        publishing: list[float] = []
        snapshot_costs: list[float] = []
        gate_costs: list[float] = []
        step = 0
        for _ in range(rounds):
            up.wait_idle(600)
            for _ in range(block):
                t0 = time.perf_counter()
                train_step()
                plain.append(time.perf_counter() - t0)
            for _ in range(block):
                step += 1
                t0 = time.perf_counter()
                loss = train_step()
                t1 = time.perf_counter()
                decision = up.on_inner_step(0, step, loss, model, opt)
                t2 = time.perf_counter()
                (snapshot_costs if decision.allowed else gate_costs).append(t2 - t1)
                publishing.append(t2 - t0)
        up.wait_idle(600)

        # A publish on its own against a raw copy of the same bytes.
        publish_s, copy_s, nbytes = [], [], 0
        target = Path(tmp) / "uploads"
        for _ in range(2):
            step += 1
            before = registry.get_sample_value("minerd_upload_duration_seconds_sum") or 0.0
            bytes_before = registry.get_sample_value("minerd_upload_bytes_total") or 0.0
            up.on_inner_step(0, step, train_step(), model, opt)
            up.wait_idle(600)
            publish_s.append((registry.get_sample_value("minerd_upload_duration_seconds_sum") or 0) - before)
            nbytes = int((registry.get_sample_value("minerd_upload_bytes_total") or 0) - bytes_before)
            rev = target / (target / "LATEST").read_text().strip()
            files = [rev / "model.safetensors", rev / "optimizer.pt"]
            with tempfile.TemporaryDirectory(dir=tmp) as copy_dir:
                copy_s.append(_copy_seconds(files, Path(copy_dir)))
        problems = verify_target(str(target))
        uploads = registry.get_sample_value("minerd_upload_attempts_total", {"result": "ok"})
        up.stop(60)

    base, pub = statistics.mean(plain), statistics.mean(publishing)
    ratio = pub / base
    over_copy = min(copy_s) / min(publish_s)
    ms = 1e3
    print(
        f"model: MLP {layers}x{width}, {params / 1e6:.1f}M params, AdamW; batch {batch}; "
        f"torch threads {torch.get_num_threads()} of {cores} cores"
    )
    print(
        f"revision: {nbytes / 1e6:.0f} MB (weights + optimizer); revisions published: {uploads:.0f}; "
        f"verify: {problems or 'ok'}"
    )
    print(f"{'':34}{'mean ms':>10}{'median ms':>11}{'n':>5}")
    print(f"{'step, no upload':34}{base * ms:>10.1f}{statistics.median(plain) * ms:>11.1f}{len(plain):>5}")
    print(
        f"{'step, publishing in background':34}{pub * ms:>10.1f}"
        f"{statistics.median(publishing) * ms:>11.1f}{len(publishing):>5}"
    )
    if snapshot_costs:
        print(
            f"{'on_inner_step, allowed (snapshot)':34}{statistics.mean(snapshot_costs) * ms:>10.1f}"
            f"{statistics.median(snapshot_costs) * ms:>11.1f}{len(snapshot_costs):>5}"
        )
    if gate_costs:
        print(
            f"{'on_inner_step, blocked (gate)':34}{statistics.mean(gate_costs) * ms:>10.3f}"
            f"{statistics.median(gate_costs) * ms:>11.3f}{len(gate_costs):>5}"
        )
    print(
        f"publish alone: {min(publish_s):.2f}s ({nbytes / min(publish_s) / 1e6:.0f} MB/s); "
        f"copy+fsync: {min(copy_s):.2f}s ({nbytes / min(copy_s) / 1e6:.0f} MB/s)"
    )
    print(f"RESULT upload step_time_ratio={ratio:.3f} throughput_over_copy={over_copy:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args().quick)
