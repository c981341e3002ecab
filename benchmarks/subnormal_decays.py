"""chunked at decays whose factors land just above the smallest normal number, for each chunk size, interleaved:
B=1, H=8, N=4096, D=128, fp32. A factor lambda^j near the smallest normal number turns its products with k
subnormal, which CPUs compute many times slower (lambda = 0.5 with chunks of 128: lambda^118 .. lambda^126); the
dispatcher halves the chunk for such decays (dispatch.SUBNORMAL_BAND). Prints, per decay, the median time of every
chunk size relative to decay 0.9 at chunk 128, and marks the chunk the dispatcher picks (*). Every chunk size is
checked against the fp64 reference at N=512 first.

    python -m benchmarks.subnormal_decays
"""

from __future__ import annotations

import statistics
import time

import torch

from leetdecoding import dispatch
from leetdecoding.inputs import validate
from leetdecoding.methods import REGISTRY
from leetdecoding.methods.naive import TOLERANCE, reference

DECAYS = (0.9, 0.5, 0.3, 0.2, 0.1, 0.05, 0.01, 1e-6)
CHUNKS = (16, 32, 64, 128)
CHUNKED = REGISTRY["chunked"]


def check(q, k, v, lam: float) -> None:
    n = 512
    q, k, v = (t[:, :, :n] for t in (q, k, v))
    ref = reference(q.double(), k.double(), v.double(), torch.full((q.shape[1],), lam, dtype=torch.float64))
    x = validate(q, k, v, lam)
    for c in CHUNKS:
        o = CHUNKED.forward(x, chunk_size=c, span_bytes=dispatch.SPAN_BYTES)[0]
        err = ((o.double() - ref.o).abs() / (TOLERANCE[torch.float32] * ref.o_abs + 1e-30)).max().item()
        assert err <= 1.0, f"decay {lam}, chunk {c}: error {err:.3g} x the fp32 tolerance"


def main(rounds: int = 5) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 4096, 128, generator=g) for _ in range(3))
    times: dict[tuple[float, int], list[float]] = {(lam, c): [] for lam in DECAYS for c in CHUNKS}
    inputs = {lam: validate(q, k, v, lam) for lam in DECAYS}
    for lam in DECAYS:
        check(q, k, v, lam)
    for _ in range(rounds + 1):  # the first round warms up
        for (lam, c), ts in times.items():
            t0 = time.perf_counter()
            CHUNKED.forward(inputs[lam], chunk_size=c, span_bytes=dispatch.SPAN_BYTES)
            ts.append(time.perf_counter() - t0)
    base = statistics.median(times[(0.9, 128)][1:])
    print(f"chunked forward, N=4096, D=128: time / time at decay 0.9, chunk 128 ({base * 1e3:.1f} ms); "
          "* = the dispatcher's chunk")
    print(f"{'decay':>8} " + " ".join(f"{'C=' + str(c):>8}" for c in CHUNKS))
    for lam in DECAYS:
        chosen = dispatch.options_for(CHUNKED, inputs[lam])["chunk_size"]
        cells = [f"{statistics.median(times[(lam, c)][1:]) / base:.2f}{'*' if c == chosen else ' '}" for c in CHUNKS]
        print(f"{lam:>8g} " + " ".join(f"{cell:>8}" for cell in cells))


if __name__ == "__main__":
    main()
