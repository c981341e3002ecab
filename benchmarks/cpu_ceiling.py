"""How close the CPU chunk loop can come to the matmul peak: its products alone, against the whole method.

    python -m benchmarks.cpu_ceiling                       # B=1, H=8, N=16384, D=128, fp32, chunk 64
    python -m benchmarks.cpu_ceiling --n 4096 --dim 64 --chunk 128

The chunked forward's useful work is 4 B H N Dk Dv flops (the two state products per token); each chunk of C tokens
also spends 2 C^2 (Dk + Dv) on its quadratic part, so the four products per chunk do 1 + C (Dk + Dv) / (2 Dk Dv)
times the useful flops (1.5x at C = 64, Dk = Dv = 128). Timed side by side, interleaved, as useful GFLOP/s over the same
run's torch.mm fp32 peak (issue 11's target is 0.5 for the whole method):

- products, cache-resident: the four (B*H)-batched products of one chunk (q k^T, scores v, q S, k^T v) repeated
  N / C times on the same operands: the matmul library's speed at these shapes with nothing else running;
- products, streaming: the same products reading each chunk of the real (B*H, N, D) inputs and writing each
  output chunk into a fresh output, with no decay factors: what memory traffic adds;
- chunked: the chunked method at that chunk size, its output checked against the fp64 reference first.

What the method loses beyond "products, streaming" is its elementwise work (the decay factors) and bookkeeping.
"""

from __future__ import annotations

import torch

import leetdecoding as ld
from benchmarks.common import arguments, header, interleaved
from benchmarks.cpu_peers import gemm_peaks
from leetdecoding.dispatch import SPAN_BYTES
from leetdecoding.inputs import validate
from leetdecoding.methods import REGISTRY
from leetdecoding.methods.base import output_buffer
from leetdecoding.methods.naive import TOLERANCE, reference, relative_error


def products(q3, k3, v3, c: int, streaming: bool):
    """The four products of each chunk of c tokens over (B*H, N, D) inputs, into reused buffers (no decays)."""
    bh, n, dk = q3.shape
    dv = v3.shape[-1]
    scores, part, state = torch.empty(bh, c, c), torch.empty(bh, c, dv), torch.zeros(bh, dk, dv)
    fixed = [t[:, :c].contiguous() for t in (q3, k3, v3)]

    def run():
        out = output_buffer(q3.unsqueeze(0), dv).flatten(0, 1) if streaming else None
        for s in range(0, n - n % c, c):
            qc, kc, vc = (t[:, s : s + c] for t in (q3, k3, v3)) if streaming else fixed
            torch.bmm(qc, kc.transpose(1, 2), out=scores)
            torch.bmm(qc, state, out=part).baddbmm_(scores, vc)
            state.baddbmm_(kc.transpose(1, 2), vc)
            if streaming:
                out[:, s : s + c] = part
        return out

    return run


def main(argv=None) -> None:
    p = arguments(__doc__, n=16384, heads=8, dim=128, chunk=64, rounds=7)
    a = p.parse_args(argv)
    header("the chunk loop's products against the whole chunked method (fp32)")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, a.heads, a.n, a.dim, generator=g) for _ in range(3))
    log_decay = ld.decay.minimax(a.heads, 0, 12)
    x = validate(q, k, v, log_decay=log_decay)

    def chunked():
        with torch.no_grad():
            return REGISTRY["chunked"].forward(x, chunk_size=a.chunk, span_bytes=SPAN_BYTES)[0]

    r = reference(q, k, v, log_decay.double().exp())
    err = relative_error(chunked(), r.o, r.o_abs)
    if err > TOLERANCE[torch.float32]:
        raise SystemExit(f"chunked: error {err:.1e} over the fp32 tolerance: nothing is timed")
    del r
    q3, k3, v3 = (t.flatten(0, 1) for t in (q, k, v))
    cases = {
        "products, cache-resident": products(q3, k3, v3, a.chunk, streaming=False),
        "products, streaming": products(q3, k3, v3, a.chunk, streaming=True),
        "chunked (leetdecoding)": chunked,
    }
    peak = gemm_peaks()["fp32"]
    stats = interleaved(cases, a.rounds)
    peak = (peak + gemm_peaks()["fp32"]) / 2  # before and after: the machine drifts
    useful = 4.0 * a.heads * a.n * a.dim * a.dim
    print(f"# N={a.n} H={a.heads} D={a.dim} chunk {a.chunk}; torch.mm fp32 peak {peak:.0f} GFLOP/s (mean of two)")
    extra = 1 + a.chunk / a.dim
    print(f"# chunked's error against fp64: {err:.1e}; the products do {extra:.2f}x the useful flops")
    print(f"{'':28s} {'median ms':>9s} {'useful GFLOP/s':>15s} {'of peak':>8s}")
    for name, s in stats.items():
        gflops = useful / s.median / 1e9
        print(f"{name:28s} {s.median * 1e3:9.1f} {gflops:15.1f} {gflops / peak:8.1%}")


if __name__ == "__main__":
    main()
