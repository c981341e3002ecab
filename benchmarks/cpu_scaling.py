"""Scaling of the CPU prefill: time against N (a fitted exponent), working memory against N, 1 against 2 threads.

    python -m benchmarks.cpu_scaling                    # B=1, H=8, D=128, fp32, N = 4096 .. 262144
    python -m benchmarks.cpu_scaling --n 4096,16384     # a shorter look

Time: the median of `--rounds` calls of leetdecoding.attention ("auto") at each N, and the exponent p of the
least-squares fit time ~ N^p over the lengths (target: p <= 1.05). Working memory: the resident high-water mark of
one call beyond its output (the inputs exist before it; target: the same at every N, i.e. bounded independently of N).
Threads: the median at the middle length with torch.set_num_threads(1) and with every thread, interleaved.
Every output is checked against the fp64 reference at the shortest length first.
"""

from __future__ import annotations

import numpy as np
import torch

import leetdecoding as ld
from benchmarks.common import arguments, header
from leetdecoding.bench.memory import measure_peak
from leetdecoding.bench.timing import interleaved, time_call
from leetdecoding.methods.naive import TOLERANCE, reference, relative_error

EXPONENT_TARGET = 1.05
MIB = 2.0**20


def inputs(n: int, heads: int, dim: int):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, heads, n, dim, generator=g) for _ in range(3))
    return q, k, v, ld.decay.minimax(heads, 0, 12)


def check(n: int, heads: int, dim: int) -> float:
    q, k, v, log_decay = inputs(n, heads, dim)
    r = reference(q, k, v, log_decay.double().exp())
    err = relative_error(ld.attention(q, k, v, log_decay=log_decay), r.o, r.o_abs)
    if err > TOLERANCE[torch.float32]:
        raise SystemExit(f"N={n}: error {err:.1e} over the tolerance: nothing is timed")
    return err


def fitted_exponent(ns: list[int], seconds: list[float]) -> float:
    """p of the least-squares line log t = p log N + c."""
    return float(np.polyfit(np.log(ns), np.log(seconds), 1)[0])


def one_length(n: int, heads: int, dim: int, rounds: int) -> tuple[float, int | None, str]:
    """Median seconds, working bytes beyond the output (None where not measurable), and auto's method."""
    q, k, v, log_decay = inputs(n, heads, dim)

    def call():
        with torch.no_grad():
            return ld.attention(q, k, v, log_decay=log_decay)

    t = time_call(call, repeats=rounds, warmup=1, device="cpu").median
    out, peak = measure_peak(call, "cpu")
    working = None if peak is None else peak - out.numel() * out.element_size()
    return t, working, ld.explain(q, k, v, log_decay=log_decay).method


def main(argv=None) -> None:
    a = arguments(__doc__, n="4096,16384,65536,262144", heads=8, dim=128, rounds=3).parse_args(argv)
    ns = [int(x) for x in a.n.split(",")]
    header(f"scaling of attention (auto), B=1 H={a.heads} D={a.dim} fp32, MiniMax decays")
    print(f"error against fp64 at N={ns[0]}: {check(ns[0], a.heads, a.dim):.1e}")
    print(f"{'N':>7s} {'method':>8s} {'median ms':>10s} {'ns/token':>9s} {'working MiB':>12s}")
    times = []
    for n in ns:
        t, working, method = one_length(n, a.heads, a.dim, a.rounds)
        shown = "n/a" if working is None else f"{working / MIB:12.1f}"
        print(f"{n:7d} {method:>8s} {t * 1e3:10.1f} {t / n * 1e9:9.0f} {shown:>12s}")
        times.append(t)
    if len(ns) > 1:
        exponent = fitted_exponent(ns, times)
        met = "met" if exponent <= EXPONENT_TARGET else "NOT MET"
        print(f"fitted exponent of time against N: {exponent:.3f} (target <= {EXPONENT_TARGET}: {met})")
    threads(ns[len(ns) // 2] if len(ns) > 2 else ns[0], a.heads, a.dim, a.rounds)


def threads(n: int, heads: int, dim: int, rounds: int) -> None:
    """1 thread against all of them at length n, interleaved."""
    q, k, v, log_decay = inputs(n, heads, dim)
    every = torch.get_num_threads()

    def with_threads(count: int):
        def call():
            torch.set_num_threads(count)
            try:
                with torch.no_grad():
                    return ld.attention(q, k, v, log_decay=log_decay)
            finally:
                torch.set_num_threads(every)

        return call

    stats = interleaved({"1 thread": with_threads(1), f"{every} threads": with_threads(every)}, rounds=rounds)
    one, all_ = (s.median for s in stats.values())
    print(f"N={n}: 1 thread {one * 1e3:.1f} ms, {every} threads {all_ * 1e3:.1f} ms: {one / all_:.2f}x "
          f"({one / all_ / every:.0%} of linear)")


if __name__ == "__main__":
    main()
