"""What this machine is: versions, device names, and its plain matmul throughput for comparison."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

import leetdecoding

from ..device import cpu_model
from .timing import time_call


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def package_version(name: str) -> str:
    """The installed version of a distribution, without importing it; "not installed" if absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    return {
        "leetdecoding": leetdecoding.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "triton": package_version("triton"),
    }


def cpu_summary() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def matmul_gflops(device: str | torch.device, n: int = 2048, repeats: int = 3) -> float:
    """fp32 torch.mm throughput on an n x n product, in GFLOP/s (2 n^3 flops per product)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    stats = time_call(lambda: torch.mm(a, b), repeats=repeats, warmup=1, device=device)
    return 2.0 * n**3 / stats.median / 1e9
