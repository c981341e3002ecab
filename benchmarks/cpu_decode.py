"""Decode: per-token latency of leetdecoding.decode_step against transformers' MiniMax per-token cache path.

    python -m benchmarks.cpu_decode          # B in {1, 16}, H=64, Dk=Dv=128, fp32

State traffic per token = one read and one write of the fp32 state (B, H, Dk, Dv), reported as GB/s beside the
machine's copy bandwidth (a torch copy of the same state) measured in the same run.
"""

from __future__ import annotations

import argparse

import torch

import leetdecoding as ld
from benchmarks.common import feed, header, interleaved, minimax_core, minimax_log_decay


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="1,16")
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--rounds", type=int, default=50)
    a = p.parse_args(argv)
    header(f"decode H={a.heads} Dk=Dv={a.dim} fp32, one token")
    print(
        f"{'B':>3s} {'transformers ms':>16s} {'leetdecoding ms':>16s} {'speed-up':>9s} {'state GB/s':>11s} "
        f"{'copy GB/s':>10s}"
    )
    for b in (int(x) for x in a.batch.split(",")):
        hf, ours, copy, traffic = measure(b, a.heads, a.dim, a.rounds)
        print(
            f"{b:3d} {hf * 1e3:16.3f} {ours * 1e3:16.3f} {hf / ours:8.2f}x {traffic / ours / 1e9:11.1f} "
            f"{traffic / copy / 1e9:10.1f}"
        )


def measure(b: int, h: int, d: int, rounds: int):
    """Median seconds per token of transformers' cache path, decode_step and a state copy; bytes of state traffic."""
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, 1, d) for _ in range(3))
    state = torch.randn(b, h, d, d)
    module = minimax_core(h, d)
    hidden = feed(module, q, k, v)
    log_decay = minimax_log_decay(module)
    cache = MiniMaxCache()
    cache.set_linear_cache(0, state.clone())
    ours_state = state.clone()
    with torch.no_grad():
        # one step each from the same state: outputs must agree before anything is timed
        hf_out = module(hidden, None, None, cache=cache)[0]
        o, _ = ld.decode_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state.clone(), log_decay=log_decay)
        err = (o.reshape(b, 1, h * d) - hf_out).abs().max() / hf_out.abs().max()
        if err > 1e-5:
            raise SystemExit(f"B={b}: outputs differ by {err:.2e}: no speed is reported")
        copy_dst = torch.empty_like(state)
        stats = interleaved(
            {
                "hf": lambda: module(hidden, None, None, cache=cache),
                "ours": lambda: ld.decode_step(
                    q[:, :, 0], k[:, :, 0], v[:, :, 0], ours_state, log_decay=log_decay, out_state=ours_state
                ),
                "copy": lambda: copy_dst.copy_(state),
            },
            rounds=rounds,
        )
    traffic = 2 * state.numel() * state.element_size()
    return stats["hf"].median, stats["ours"].median, stats["copy"].median, traffic


if __name__ == "__main__":
    main()
