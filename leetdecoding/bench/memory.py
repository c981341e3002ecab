"""Peak memory of one call: the CUDA allocator's peak, or the process's RSS high-water mark on Linux.

    with PeakMemory(device) as peak:
        fn()
    peak.bytes        # extra bytes at the peak, or None where it cannot be measured
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import TypeVar

import torch

from .timing import synchronize

T = TypeVar("T")


def _status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM), or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc malloc_trim), so RSS starts low; ignore failures."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring the peak extra memory allocated inside it, in bytes (`.bytes`)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.bytes: int | None = None
        self._before: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _trim_heap()
            rss = _status_kib("VmRSS")
            self._before = rss * 1024 if rss is not None and _reset_high_water_mark() else None
        return self

    def __exit__(self, *exc) -> None:
        if self._before is None:
            return
        if self.device.type == "cuda":
            synchronize(self.device)
            self.bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._before)
        else:
            hwm = _status_kib("VmHWM")
            self.bytes = None if hwm is None else max(0, hwm * 1024 - self._before)


def measure_peak(fn: Callable[[], T], device: torch.device | str) -> tuple[T, int | None]:
    """Run `fn` once; return its result and the peak extra bytes it needed (None if not measurable)."""
    with PeakMemory(device) as peak:
        result = fn()
    return result, peak.bytes
