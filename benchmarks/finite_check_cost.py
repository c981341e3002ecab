"""Cost of the causality check in leetdecoding.segments (one pass over the output per method call):
chunked fp32 at B=1, H=8, D=128, N=16384, with the check and with the method called directly (no check).

    PYTHONPATH=. .venv/bin/python benchmarks/finite_check_cost.py
"""

import statistics
import time

import torch

import leetdecoding as ld
from leetdecoding import segments
from leetdecoding.methods import REGISTRY


def median_ms(fn, reps=7):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), statistics.pstdev(times)


def main(n=16384):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, n, 128) for _ in range(3))
    x = ld.inputs.validate(q, k, v, 0.99)
    chunked = REGISTRY["chunked"]
    options = ld.dispatch.options_for(chunked, x)
    o, state = chunked.forward(x, **options)
    with_check = median_ms(lambda: segments.forward(chunked, x, options))
    without = median_ms(lambda: chunked.forward(x, **options))
    check_only = median_ms(lambda: segments._suspect(x, o, state))
    print(f"N={n}: chunked with check {with_check[0]:.1f} ms (sd {with_check[1]:.1f}), "
          f"without {without[0]:.1f} ms (sd {without[1]:.1f}); the check alone {check_only[0]:.2f} ms")


if __name__ == "__main__":
    main()
