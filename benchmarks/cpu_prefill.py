"""Prefill: leetdecoding.attention against transformers' MiniMaxLightningAttention prefill loop, interleaved.

python benchmarks/cpu_prefill.py                # B=1, H=8, N=16384, D=128, fp32, MiniMax decays
"""

from __future__ import annotations

import torch

import leetdecoding as ld
from benchmarks.common import arguments, feed, header, interleaved, minimax_core, minimax_log_decay


def main(argv=None) -> None:
    a = arguments(__doc__, batch=1, heads=8, n=16384, dim=128, rounds=5).parse_args(argv)
    mm = header(f"prefill B={a.batch} H={a.heads} N={a.n} D={a.dim} fp32, MiniMax decays (layer 0 of 12)")
    torch.manual_seed(0)
    q, k, v = (torch.randn(a.batch, a.heads, a.n, a.dim) for _ in range(3))
    module = minimax_core(a.heads, a.dim)
    hidden = feed(module, q, k, v)
    log_decay = minimax_log_decay(module)
    b, h, n, d = q.shape
    with torch.no_grad():
        loop_out = module(hidden, None, None)[0]
        ours = ld.attention(q, k, v, log_decay=log_decay)
        err = ((ours.transpose(1, 2).reshape(b, n, h * d) - loop_out).abs().max() / loop_out.abs().max()).item()
        method = ld.explain(q, k, v, log_decay=log_decay).method
        stats = interleaved(
            {
                "transformers MiniMax loop": lambda: module(hidden, None, None),
                f"leetdecoding auto ({method})": lambda: ld.attention(q, k, v, log_decay=log_decay),
            },
            rounds=a.rounds,
        )
    useful = 4.0 * b * h * n * d * d
    print(f"max relative difference between the two outputs: {err:.2e}")
    if err > 1e-4:
        raise SystemExit("outputs differ: no speed is reported")
    print(f"{'':32s} {'median ms':>10s} {'min..max ms':>17s} {'GFLOP/s':>8s} {'of mm':>6s}")
    for name, s in stats.items():
        g = useful / s.median / 1e9
        print(f"{name:32s} {s.median * 1e3:10.1f} {s.min * 1e3:8.1f}..{s.max * 1e3:<8.1f} {g:8.1f} {g / mm:6.1%}")
    loop, ours_s = stats.values()
    print(f"speed-up of leetdecoding over the loop: {loop.median / ours_s.median:.2f}x (median over {a.rounds} rounds)")


if __name__ == "__main__":
    main()
