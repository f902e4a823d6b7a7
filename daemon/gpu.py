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
