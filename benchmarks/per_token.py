"""Per-token decays against a constant decay: the same call with log_decay (B, H, N) and with (H,), side by side.

    python -m benchmarks.per_token                     # N = 16384, H = 8, D = 128, fp32, forward
    python -m benchmarks.per_token --grad 1            # forward + backward

The issue's target: a per-token decay costs at most 1.25x the constant one at N = 16384 on CPU. Both outputs are
checked against each other first (per-token values equal to the constant decay must give the same result).
"""

from __future__ import annotations

import torch

import leetdecoding as ld

from .common import arguments, header, interleaved

TARGET = 1.25


def main() -> None:
    p = arguments(__doc__, n=16384, heads=8, dim=128, batch=1, rounds=5, grad=0)
    p.add_argument("--methods", default="chunked,recurrent")
    a = p.parse_args()
    header(f"per-token against constant decay, B={a.batch} H={a.heads} N={a.n} D={a.dim} fp32")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(a.batch, a.heads, a.n, a.dim, generator=g) for _ in range(3))
    constant = ld.decay.minimax(a.heads, 3, 12)
    per_token = constant.view(1, -1, 1).expand(a.batch, -1, a.n).contiguous()
    for method in a.methods.split(","):
        n = a.n if method != "recurrent" else min(a.n, 2048)  # the recurrence: one step per token, shorter run
        x = [t[:, :, :n].requires_grad_(bool(a.grad)) for t in (q, k, v)]

        def run(decay, x=x, method=method):
            o = ld.attention(*x, log_decay=decay, method=method)
            if a.grad:
                o.sum().backward()
            return o

        gates = per_token[..., :n]
        same = (run(constant) - run(gates)).abs().max().item()
        stats = interleaved({"constant": lambda: run(constant), "per-token": lambda g=gates: run(g)}, a.rounds)
        ratio = stats["per-token"].median / stats["constant"].median
        verdict = "met" if ratio <= TARGET else "NOT met"
        print(f"{method:10s} N={n:6d} constant {stats['constant'].median * 1e3:8.1f} ms  per-token "
              f"{stats['per-token'].median * 1e3:8.1f} ms  ratio {ratio:.2f} (target <= {TARGET}: {verdict})  "
              f"max |difference| {same:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
