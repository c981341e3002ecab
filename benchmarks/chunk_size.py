"""The chunked method's chunk size: the sweep behind dispatch.CHUNK_SIZE / CHUNK_SIZE_SMALL_HEAD.

python -m benchmarks.chunk_size              # B=1, H=8, N=16384, D in {64, 128, 256}, fp32 and bf16

The forward runs one chunk at a time whatever the span budget (spans only mark where a forward with
gradients keeps a state for the backward), so `--spans-mib` matters for training only.
"""

from __future__ import annotations

import argparse

import torch

import leetdecoding as ld
from benchmarks.common import header, interleaved
from leetdecoding.inputs import validate
from leetdecoding.methods import REGISTRY


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dims", default="64,128,256")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--chunks", default="32,64,128,256")
    p.add_argument("--spans-mib", default="8")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    header(f"chunked: chunk size x span budget, B=1 H={a.heads} N={a.n}")
    chunked = REGISTRY["chunked"]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for name, d in ((name, int(x)) for name in a.dtypes.split(",") for x in a.dims.split(",")):
        q, k, v = (torch.randn(1, a.heads, a.n, d).to(dtypes[name]) for _ in range(3))
        x = validate(q, k, v, log_decay=ld.decay.minimax(a.heads, 0, 12))
        cases = {
            (c, s): (lambda c=c, s=s, x=x: chunked.forward(x, chunk_size=c, span_bytes=s << 20))
            for c in (int(t) for t in a.chunks.split(","))
            for s in (int(t) for t in a.spans_mib.split(","))
        }
        stats = interleaved(cases, rounds=a.rounds)
        best = min(stats, key=lambda key: stats[key].median)
        times = "  ".join(f"C={c} span={s}MiB {st.median * 1e3:.0f}ms" for (c, s), st in stats.items())
        print(f"{name} D={d}:  {times}")
        print(f"{name} D={d}: fastest C={best[0]} span={best[1]} MiB")


if __name__ == "__main__":
    main()
