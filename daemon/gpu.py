"""GPU facts from torch.cuda and, when present, NVML.

Absent GPU or absent NVML is a normal case, not an error: the probe returns
no devices or no utilisation, and nothing imports NVML until asked.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import structlog
import torch

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class GpuStats:
    device: str  # "cuda:0"
    name: str
    allocated_bytes: int
    reserved_bytes: int
    total_bytes: int
    utilization_ratio: float | None  # 0..1 from NVML, None when unknown


class _Nvml:
    """Lazily initialised NVML handle; a no-op when the library or driver is missing."""

    def __init__(self) -> None:
        self._mod: Any = None
        self._tried = False

    def _load(self) -> Any:
        if not self._tried:
            self._tried = True
            try:
                import pynvml  # nvidia-ml-py

                pynvml.nvmlInit()
                self._mod = pynvml
            except Exception as exc:  # any failure means "no NVML here"
                log.debug("nvml unavailable", reason=str(exc))
                self._mod = None
        return self._mod

    def utilization(self, index: int) -> float | None:
        mod = self._load()
        if mod is None:
            return None
        try:
            handle = mod.nvmlDeviceGetHandleByIndex(index)
            return float(mod.nvmlDeviceGetUtilizationRates(handle).gpu) / 100.0
        except Exception:
            return None


class GpuProbe:
    def __init__(self) -> None:
        self._nvml = _Nvml()

    @staticmethod
    def cuda_available() -> bool:
        return torch.cuda.is_available()

    def devices(self) -> list[GpuStats]:
        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            total = 0
            with contextlib.suppress(RuntimeError):
                total = int(torch.cuda.get_device_properties(i).total_memory)
            out.append(
                GpuStats(
                    device=f"cuda:{i}",
                    name=torch.cuda.get_device_name(i),
                    allocated_bytes=int(torch.cuda.memory_allocated(i)),
                    reserved_bytes=int(torch.cuda.memory_reserved(i)),
                    total_bytes=total,
                    utilization_ratio=self._nvml.utilization(i),
                )
            )
        return out

    @staticmethod
    def allocated_gb(device: torch.device) -> float:
        if device.type != "cuda":
            return 0.0
        return torch.cuda.memory_allocated(device) / 1e9


# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s (SXM parts where two
# exist: the PCIe H100 is matched first). Longest name first, so "H100 PCIe" wins over "H100".
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H200": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 6000 Ada": 364.0,
    "RTX A6000": 155.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def peak_flops(device: torch.device, configured_tflops: float = 0.0) -> float | None:
    """The device's peak dense bf16 FLOP/s: ``telemetry.peak_tflops`` when set, else the
    table above by the GPU's name; None on a CPU or an unlisted GPU (MFU is then not reported)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None
