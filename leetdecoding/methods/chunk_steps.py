"""The forward of one chunk of the chunked method, for every (batch row, head) at once.

For a chunk of r tokens starting at s, with the state S (B*H, Dk, Dv) at its start, updated in place:

    o[s:s+r] = scale * (((q k^T) * mask) v + (q * lambda^(t+1)) S)     S <- lambda^r S + (k * lambda^(r-1-t))^T v

Each product is one (B*H)-batched matmul into a buffer reused from chunk to chunk, so the state stays in cache
and nothing per chunk is allocated. The products are in the compute dtype (fp32, or fp64 for fp64 inputs); lower-
precision inputs are copied chunk by chunk into compute-dtype buffers.

bf16 products were measured and are not used: a bf16 matmul on CPU rounds its result to bf16 (PyTorch's CPU
backend has no fp32-output bf16 matmul), so the scores and their decayed copy carry one bf16 rounding each beyond
the output's own: 2.9e-3 to 4.1e-3 against the contract's 4e-3 bf16 tolerance at N = 65536 with MiniMax decays,
for about 1.3x the speed of fp32 products on a CPU with AMX (2026-11-30).
"""

from __future__ import annotations

import torch


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) as (B*H, N, D): a view where B and H merge, else one copy."""
    return t.flatten(0, 1)


class ComputeDtypeStep:
    """Products in the compute dtype (the decays' dtype), updating the state in place."""

    def __init__(self, q, k, v, o, dd, r: int, scale: float):
        B, H, _, Dk = q.shape
        Dv = v.shape[-1]
        cd = dd.chunk.dtype
        self.r, self.scale, self.heads = r, scale, (B, H)
        self.q, self.k, self.v, self.o = (_flat(t) for t in (q, k, v, o))
        self.mask = dd.mask.view(H, r, r)
        self.q_decay, self.k_decay = dd.q.view(H, r, 1), dd.k.view(H, r, 1)
        self.chunk_decay = dd.chunk.view(H, 1, 1)
        new = lambda d: torch.empty(B * H, r, d, dtype=cd, device=q.device)  # noqa: E731
        self.scores, self.qd, self.kd, self.out = new(r), new(Dk), new(Dk), new(Dv)
        self.upcast = [new(Dk), new(Dk), new(Dv)] if q.dtype != cd else None

    def __call__(self, state: torch.Tensor, s: int) -> torch.Tensor:
        B, H = self.heads
        r = self.r
        qc, kc, vc = (t[:, s : s + r] for t in (self.q, self.k, self.v))
        if self.upcast is not None:
            qc, kc, vc = (buf.copy_(t) for buf, t in zip(self.upcast, (qc, kc, vc)))
        torch.bmm(qc, kc.transpose(1, 2), out=self.scores)
        self.scores.view(B, H, r, r).mul_(self.mask)
        torch.mul(qc.unflatten(0, (B, H)), self.q_decay, out=self.qd.view(B, H, r, -1))
        torch.bmm(self.qd, state, out=self.out)  # the state's part, before the state moves on
        self.out.baddbmm_(self.scores, vc)
        if self.scale != 1.0:
            self.out.mul_(self.scale)
        self.o[:, s : s + r] = self.out
        torch.mul(kc.unflatten(0, (B, H)), self.k_decay, out=self.kd.view(B, H, r, -1))
        state.view(B, H, *state.shape[1:]).mul_(self.chunk_decay)
        return state.baddbmm_(self.kd.transpose(1, 2), vc)


class DifferentiableStep(ComputeDtypeStep):
    """The same products out of place, so that autograd can differentiate the forward (a double backward
    recomputes it under autograd); slower, and it allocates per chunk."""

    def __call__(self, state: torch.Tensor, s: int) -> torch.Tensor:
        B, H = self.heads
        r = self.r
        cd = state.dtype
        qc, kc, vc = (t[:, s : s + r].to(cd) for t in (self.q, self.k, self.v))
        scores = (qc @ kc.transpose(1, 2)).unflatten(0, (B, H)) * self.mask
        qd = qc.unflatten(0, (B, H)) * self.q_decay
        out = (scores.flatten(0, 1) @ vc + qd.flatten(0, 1) @ state) * self.scale
        self.o[:, s : s + r] = out
        kd = (kc.unflatten(0, (B, H)) * self.k_decay).flatten(0, 1)
        return (state.unflatten(0, (B, H)) * self.chunk_decay).flatten(0, 1) + kd.transpose(1, 2) @ vc
