"""Decode: per-token latency of leetdecoding.decode_step against transformers' MiniMax per-token cache path.

    python -m benchmarks.cpu_decode          # B in {1, 16}, H=64, Dk=Dv=128, fp32 and bf16 q/k/v, fp32 state
    python -m benchmarks.cpu_decode --dtype bf16 --threads 1 --rounds 20

State traffic per token = one read and one write of the fp32 state (B, H, Dk, Dv), reported as GB/s beside the
machine's copy bandwidth (a torch copy of the same state) measured in the same run; the target (issue 11) is 70%
or more of it. "3-pass" is the step before the state was blocked (decay, update and output product each a pass
over the whole state), timed in the same run as the baseline.
"""

from __future__ import annotations

import torch

import leetdecoding as ld
from benchmarks.common import arguments, feed, header, interleaved, minimax_core, minimax_log_decay

TARGET = 0.70  # issue 11: state traffic at 70% or more of the same run's copy bandwidth


def main(argv=None) -> None:
    p = arguments(__doc__, batch="1,16", heads=64, dim=128, rounds=50)
    p.add_argument("--dtype", default="fp32,bf16", help="q/k/v dtypes, comma list of fp32, bf16 (the state is fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    header(f"decode H={a.heads} Dk=Dv={a.dim}, fp32 state, one token")
    print(
        f"{'dtype':>5s} {'B':>3s} {'transformers ms':>16s} {'3-pass ms':>10s} {'leetdecoding ms':>16s} "
        f"{'speed-up':>9s} {'3-pass GB/s':>12s} {'state GB/s':>11s} {'copy GB/s':>10s} {'of copy':>8s} {'target':>7s}"
    )
    for name in a.dtype.split(","):
        dtype = DTYPES[name]
        for b in (int(x) for x in a.batch.split(",")):
            t = measure(b, a.heads, a.dim, a.rounds, dtype)
            hf = f"{t['hf'] * 1e3:16.3f}" if "hf" in t else f"{'-':>16s}"
            speed_up = f"{t['hf'] / t['ours']:8.2f}x" if "hf" in t else f"{'-':>9s}"
            fraction = t["copy"] / t["ours"]
            print(
                f"{name:>5s} {b:3d} {hf} {t['3-pass'] * 1e3:10.3f} {t['ours'] * 1e3:16.3f} {speed_up} "
                f"{t['traffic'] / t['3-pass'] / 1e9:12.1f} {t['traffic'] / t['ours'] / 1e9:11.1f} "
                f"{t['traffic'] / t['copy'] / 1e9:10.1f} {fraction:8.2f} {'>=' if fraction >= TARGET else '< '}"
                f"{TARGET:.2f}"
            )


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def three_pass(q, k, v, state, lam, scale):
    """decode_step's CPU step before blocking (the baseline): decay, rank-1 update and output product each a
    pass over the whole state."""
    cd, dtype = state.dtype, q.dtype
    q, k, v = q.to(cd), k.to(cd), v.to(cd)
    new = torch.mul(state, lam, out=state).addcmul_(k.unsqueeze(-1), v.unsqueeze(-2))
    b, h, dk, dv = state.shape
    o = torch.bmm(q.reshape(b * h, 1, dk), new.reshape(b * h, dk, dv)).view(b, h, dv)
    return (o * scale).to(dtype), new


def measure(b: int, h: int, d: int, rounds: int, dtype: torch.dtype) -> dict:
    """Median seconds per token of transformers' cache path (fp32 only), the 3-pass baseline, decode_step and a
    state copy; bytes of state traffic."""
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, 1, d) for _ in range(3))
    state = torch.randn(b, h, d, d)
    module = minimax_core(h, d)
    hidden = feed(module, q, k, v)
    log_decay = minimax_log_decay(module)
    lam = torch.exp(log_decay.double()).float().view(1, -1, 1, 1)
    cache = MiniMaxCache()
    cache.set_linear_cache(0, state.clone())
    q1, k1, v1 = (t[:, :, 0].to(dtype) for t in (q, k, v))
    with torch.no_grad():
        # one step each from the same state: outputs must agree with fp64 (and transformers') before any timing
        o, _ = ld.decode_step(q1, k1, v1, state.clone(), log_decay=log_decay)
        qd, kd, vd = (t.double() for t in (q1, k1, v1))
        exact = torch.exp(log_decay.double()).view(1, -1, 1, 1) * state.double() + kd[..., None] * vd[..., None, :]
        ref = (qd[..., None, :] @ exact).squeeze(-2)
        err = (o.double() - ref).abs().max() / ref.abs().max()
        if err > (1e-5 if dtype == torch.float32 else 1e-2):
            raise SystemExit(f"B={b} {dtype}: decode_step is off the fp64 step by {err:.2e}: no speed is reported")
        cases = {}
        if dtype == torch.float32:
            hf_out = module(hidden, None, None, cache=cache)[0]
            err = (o.reshape(b, 1, h * d) - hf_out).abs().max() / hf_out.abs().max()
            if err > 1e-5:
                raise SystemExit(f"B={b}: outputs differ from transformers' by {err:.2e}: no speed is reported")
            cases["hf"] = lambda: module(hidden, None, None, cache=cache)
        base_state, ours_state, copy_dst = state.clone(), state.clone(), torch.empty_like(state)
        cases["3-pass"] = lambda: three_pass(q1, k1, v1, base_state, lam, 1.0)
        cases["ours"] = lambda: ld.decode_step(q1, k1, v1, ours_state, log_decay=log_decay, out_state=ours_state)
        cases["copy"] = lambda: copy_dst.copy_(state)
        stats = interleaved(cases, rounds=rounds)
    times = {name: s.median for name, s in stats.items()}
    times["traffic"] = 2 * state.numel() * state.element_size()
    return times


if __name__ == "__main__":
    main()
