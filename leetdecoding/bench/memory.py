"""Peak memory of one call: the CUDA allocator's peak, or the process's RSS high-water mark on Linux.

    with PeakMemory(device) as peak:
        fn()
    peak.bytes        # extra bytes at the peak, or None where it cannot be measured

psutil is not used here: it reports the current RSS (and the stdlib's getrusage a peak that never resets), while a
call's peak needs the high-water mark reset before it, which Linux offers through /proc/self/clear_refs.
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


def attention_peak(
    method: str,
    shape: tuple[int, int, int, int, int],
    dtype: torch.dtype = torch.float32,
    *,
    initial_state: bool = False,
    output_final_state: bool = False,
    grad: bool = False,
    per_token: bool = False,
) -> tuple[int | None, int]:
    """(measured peak, estimate) in bytes of one CPU `ld.attention` call with (B, H, N, Dk, Dv) = `shape`.

    The peak is what the call adds to the process's resident memory while it runs, its results (and with `grad`
    the tensors autograd keeps for the backward) included; the estimate is what the memory guard plans for it
    (`dispatch.estimate_bytes`, the method's `extra_memory_bytes` plus output and final state). None for the peak
    where the high-water mark cannot be reset. A first call at a small N loads code and thread pools, so that
    they are not counted. `per_token`: the same decays given per token, (B, H, N).
    """
    from .. import api, dispatch
    from ..inputs import compute_dtype_for, validate

    b, h, n, dk, dv = shape
    g = torch.Generator().manual_seed(0)
    log_decay = -torch.linspace(0.01, 1.0, h, dtype=compute_dtype_for(dtype))

    def inputs(length: int) -> dict:
        decay = log_decay.view(1, h, 1).expand(b, h, length).contiguous() if per_token else log_decay
        q, k, v = (torch.randn(b, h, length, d, generator=g).to(dtype).requires_grad_(grad) for d in (dk, dk, dv))
        s0 = torch.randn(b, h, dk, dv, generator=g).to(compute_dtype_for(dtype)) if initial_state else None
        return {"q": q, "k": k, "v": v, "log_decay": decay, "initial_state": s0,
                "output_final_state": output_final_state}  # fmt: skip

    api.attention(**inputs(min(n, 70)), method=method)  # warm-up
    args = inputs(n)
    x = validate(args["q"], args["k"], args["v"], None, args["log_decay"], 1.0, args["initial_state"],
                 output_final_state)  # fmt: skip
    estimate = dispatch.choose(x, method).estimate_bytes
    with PeakMemory("cpu") as peak:
        result = api.attention(**args, method=method)
    del result
    return peak.bytes, estimate


# Every allocation of 64 KiB or more is its own mapping, returned to the OS when freed: the resident high-water
# mark is then the peak of live memory. With glibc's default, the threshold grows to 32 MiB after a free, and
# freed heap memory stays resident: the mark then depends on what ran before (fleet measured 246 MiB instead of
# 174 MiB of live memory).
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def measure_cases(cases: list[dict]):
    """Run `attention_peak` for each case in one fresh process with MEASURE_ENV; each case is a dict of
    method, shape (B, H, N, Dk, Dv), dtype ("fp32", "bf16", "fp16", "fp64") and the flags initial_state,
    output_final_state, grad, per_token. Yields each case, as it is measured, with "peak" (bytes or None) and
    "estimate"."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, **MEASURE_ENV, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    with subprocess.Popen(
        [sys.executable, "-c", "import sys; from leetdecoding.bench.memory import _main; _main(sys.argv[1:])",
         json.dumps(cases)],
        env=env, stdout=subprocess.PIPE, text=True,
    ) as proc:  # fmt: skip
        for line in proc.stdout:
            yield json.loads(line)
    if proc.returncode:
        raise RuntimeError(f"the measuring process failed with exit code {proc.returncode} (its error is above)")


def _main(argv: list[str]) -> None:
    import json

    for case in json.loads(argv[0]):
        flags = {f: bool(case.get(f, False)) for f in ("initial_state", "output_final_state", "grad", "per_token")}
        peak, estimate = attention_peak(case["method"], tuple(case["shape"]), DTYPES[case["dtype"]], **flags)
        print(json.dumps({**case, "peak": peak, "estimate": estimate}), flush=True)
