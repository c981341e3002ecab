"""chunked at decays whose factors come close to the smallest normal number, against decay 0.9, interleaved:
B=1, H=8, N=4096, D=128, fp32. With chunks of 128, lambda = 0.5 puts lambda^118 .. lambda^126 just above the
smallest normal number and their products with k subnormal, which CPUs compute many times slower; the dispatcher
halves the chunk for such decays (dispatch.SUBNORMAL_BAND). The chunk used is printed beside each time. Every
output is checked against the fp64 reference at N=512 first.

    python -m benchmarks.subnormal_decays
"""

from __future__ import annotations

import statistics
import time

import torch

import leetdecoding as ld
from leetdecoding.bench.reference import TOLERANCE, reference

DECAYS = {
    "0.9": [0.9] * 8,
    "0.5": [0.5] * 8,
    "0.45": [0.45] * 8,
    "1e-6": [1e-6] * 8,
    "0.9 x 7, 0.5": [0.9] * 7 + [0.5],
}


def check(q, k, v):
    for name, lam in DECAYS.items():
        n = 512
        o = ld.attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], decay=torch.tensor(lam), method="chunked")
        ref = reference(q[:, :, :n].double(), k[:, :, :n].double(), v[:, :, :n].double(), torch.tensor(lam).double())
        err = ((o.double() - ref.o).abs() / (TOLERANCE[torch.float32] * ref.o_abs + 1e-30)).max().item()
        assert err <= 1.0, f"decay {name}: error {err:.3g} x the fp32 tolerance"


def main(rounds: int = 7) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 4096, 128, generator=g) for _ in range(3))
    check(q, k, v)
    lams = {name: torch.tensor(lam) for name, lam in DECAYS.items()}
    times: dict[str, list[float]] = {name: [] for name in lams}
    for lam in lams.values():
        ld.attention(q, k, v, decay=lam, method="chunked")  # warm up
    for _ in range(rounds):
        for name, lam in lams.items():
            t0 = time.perf_counter()
            ld.attention(q, k, v, decay=lam, method="chunked")
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["0.9"])
    for name, ts in times.items():
        t = statistics.median(ts)
        chunk = ld.explain(q, k, v, decay=lams[name], method="chunked").options["chunk_size"]
        print(f"decay {name:>14}: {t * 1e3:7.1f} ms  ({t / base:.2f}x decay 0.9), chunk {chunk}")


if __name__ == "__main__":
    main()
