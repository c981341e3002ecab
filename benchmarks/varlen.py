"""Packed variable-length prefill against one call on a single sequence with the same total number of tokens.

python -m benchmarks.varlen              # 16 sequences, lengths drawn from 1..4096, H=8, D=128, fp32
"""

from __future__ import annotations

import torch

import leetdecoding as ld
from benchmarks.common import arguments, header, interleaved


def main(argv=None) -> None:
    a = arguments(__doc__, sequences=16, max_len=4096, heads=8, dim=128, rounds=5, seed=0).parse_args(argv)
    g = torch.Generator().manual_seed(a.seed)
    lengths = torch.randint(1, a.max_len + 1, (a.sequences,), generator=g)
    total = int(lengths.sum())
    header(f"varlen: {a.sequences} sequences, lengths 1..{a.max_len} (total {total}), H={a.heads} D={a.dim} fp32")
    cu = torch.cat((torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)))
    q, k, v = (torch.randn(1, a.heads, total, a.dim, generator=g) for _ in range(3))
    log_decay = ld.decay.minimax(a.heads, 0, 12)
    with torch.no_grad():
        stats = interleaved(
            {
                "packed": lambda: ld.attention(q, k, v, log_decay=log_decay, cu_seqlens=cu, output_final_state=True),
                "single": lambda: ld.attention(q, k, v, log_decay=log_decay, output_final_state=True),
            },
            rounds=a.rounds,
        )
    packed, single = stats["packed"].median, stats["single"].median
    print(f"lengths: {lengths.tolist()}")
    print(
        f"packed {packed * 1e3:.1f} ms, one sequence of {total} tokens {single * 1e3:.1f} ms: "
        f"ratio {packed / single:.2f} (target <= 1.25)"
    )


if __name__ == "__main__":
    main()
