"""Huge pages for large CPU outputs (leetdecoding/methods/hugepages.py): on against off, interleaved.

    python -m benchmarks.hugepages        # B=1, H=8, N=16384, D=128, fp32: forward, and forward + backward
"""

from __future__ import annotations

import argparse

import torch

import leetdecoding as ld
from benchmarks.common import header, interleaved
from leetdecoding.methods import hugepages


def switched(on: bool, fn):
    """fn with huge-page requests on or off (the library's own switch: whether madvise is available)."""
    advise = hugepages._madvise()

    def call():
        hugepages._madvise = (lambda: advise) if on else (lambda: None)
        try:
            return fn()
        finally:
            hugepages._madvise = lambda: advise

    return call


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args(argv)
    header(f"huge pages for outputs, B=1 H=8 N={a.n} D=128 fp32")
    if hugepages._madvise() is None:
        raise SystemExit("huge pages cannot be requested here (not Linux, or the kernel's THP mode is not madvise)")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, a.n, 128, requires_grad=True) for _ in range(3))
    do = torch.randn(1, 8, a.n, 128)
    log_decay = ld.decay.minimax(8, 0, 12)

    def forward():
        with torch.no_grad():
            return ld.attention(q, k, v, log_decay=log_decay)

    def training():
        return torch.autograd.grad(ld.attention(q, k, v, log_decay=log_decay), (q, k, v), do)

    for name, fn in (("forward", forward), ("forward + backward", training)):
        stats = interleaved({"off": switched(False, fn), "on": switched(True, fn)}, rounds=a.rounds)
        off, on = stats["off"].median, stats["on"].median
        print(f"{name:20s} off {off * 1e3:8.1f} ms  on {on * 1e3:8.1f} ms  off/on {off / on:.2f}x")


if __name__ == "__main__":
    main()
