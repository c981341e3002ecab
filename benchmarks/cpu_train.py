"""Training step: forward + backward of leetdecoding.attention ("auto") against autograd through transformers'
MiniMaxLightningAttention prefill loop, on the same inputs; time and peak memory.

    python -m benchmarks.cpu_train                     # B=1, H=8, N in {4096, 16384, 65536}, D=128, fp32
    git worktree add /tmp/before 4a2703e && python -m benchmarks.cpu_train --baseline /tmp/before   # + that commit
"""

from __future__ import annotations

import torch

import leetdecoding as ld
from benchmarks.common import arguments, feed, header, interleaved, minimax_core, minimax_log_decay
from benchmarks.decay_cache import load_baseline
from leetdecoding.bench.memory import measure_peak

TRAIN_PEAK_TARGET = 0.35


def main(argv=None) -> None:
    p = arguments(__doc__, n="4096,16384,65536", heads=8, dim=128, rounds=3)
    p.add_argument("--baseline", help="a checkout of another commit, timed beside this one (e.g. a git worktree)")
    a = p.parse_args(argv)
    baseline = load_baseline(a.baseline) if a.baseline else None
    mm = header(f"forward + backward, B=1 H={a.heads} D={a.dim} fp32, MiniMax decays (layer 0 of 12)")
    print(f"{'N':>6s} {'loop ms':>9s} {'ours ms':>9s} {'speed-up':>9s} {'loop peak MiB':>14s} {'ours peak MiB':>14s} "
          f"{'ratio':>6s} {'max grad err':>13s} {'of mm':>6s}")
    for n in (int(x) for x in a.n.split(",")):
        row = measure(n, a.heads, a.dim, a.rounds, baseline)
        useful = 3 * 4.0 * a.heads * n * a.dim * a.dim / row["ours"] / 1e9  # forward + backward: 3 x 4 B H N Dk Dv
        print(f"{n:6d} {row['loop'] * 1e3:9.0f} {row['ours'] * 1e3:9.0f} {row['loop'] / row['ours']:8.2f}x "
              f"{row['loop_peak'] / 2**20:14.0f} {row['ours_peak'] / 2**20:14.0f} "
              f"{row['ours_peak'] / row['loop_peak']:6.2f} {row['err']:13.1e} {useful / mm:6.0%}")
        if baseline is not None:
            print(f"{'':6s} --baseline: {row['before'] * 1e3:.0f} ms, peak {row['before_peak'] / 2**20:.0f} MiB "
                  f"(this checkout {row['before'] / row['ours']:.2f}x faster)")
    print(f"target (issue 11): forward + backward at N=16384, D=128 at least {TRAIN_PEAK_TARGET:.0%} of torch.mm's "
          "fp32 GFLOP/s in useful GFLOP/s (the 'of mm' column)")


def measure(n: int, h: int, d: int, rounds: int, baseline=None) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, requires_grad=True) for _ in range(3))
    do = torch.randn(1, h, n, d)
    module = minimax_core(h, d)
    hidden = feed(module, q, k, v)
    log_decay = minimax_log_decay(module)

    do_loop = do.transpose(1, 2).reshape(1, n, h * d)

    # a scalar loss <o, do>, so that neither side keeps its output alive through the backward
    def loop_step():
        loss = (module(hidden, None, None)[0] * do_loop).sum()  # the loop's output is (B, N, H * D)
        return torch.autograd.grad(loss, (q, k, v))

    def step(lib):
        def call():
            loss = (lib.attention(q, k, v, log_decay=log_decay) * do).sum()
            return torch.autograd.grad(loss, (q, k, v))

        return call

    cases = {"loop": loop_step, "ours": step(ld)} | ({"before": step(baseline)} if baseline is not None else {})
    grads, peaks = {}, {}
    for name, call in cases.items():
        grads[name], peaks[name] = measure_peak(call, "cpu")
    err = max(((a - b).abs().max() / b.abs().max()).item() for g in grads.values() for a, b in zip(g, grads["loop"]))
    if err > 1e-3:
        raise SystemExit(f"N={n}: gradients differ by {err:.2e}: no speed is reported")
    del grads
    stats = interleaved(cases, rounds=rounds, warmup=0)
    row = {name: s.median for name, s in stats.items()} | {f"{name}_peak": b for name, b in peaks.items()}
    return row | {"err": err}


if __name__ == "__main__":
    main()
