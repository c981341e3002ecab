"""The forward of one chunk of the chunked method, for every (batch row, head) at once.

For a chunk of r tokens starting at s, with the state S (B*H, Dk, Dv) at its start, updated in place:

    o[s:s+r] = scale * (((q k^T) * mask) v + (q * lambda^(t+1)) S)     S <- lambda^r S + (k * lambda^(r-1-t))^T v

Each product is one (B*H)-batched matmul into a buffer reused from chunk to chunk, so the state stays in cache
and nothing per chunk is allocated. Two ways to compute the products:

- `ComputeDtypeStep`: in the compute dtype (fp32, or fp64 for fp64 inputs); lower-precision inputs are copied
  chunk by chunk into compute-dtype buffers. Exact to the compute dtype's rounding.
- `InputDtypeStep` (bf16 inputs, precision="fast", never chosen by "auto"): the products in bf16 with the
  state, the decays and the accumulation in fp32. A bf16 matmul on CPU rounds its result to bf16 (there is no
  fp32-output bf16 matmul in PyTorch's CPU backend), so the scores and their decayed copy each carry one bf16
  rounding more than the output's own: measured 2.9e-3 to 4.1e-3 against the contract's 4e-3 bf16 tolerance at
  N = 65536 (MiniMax decays), for about 1.3x the speed of fp32 products on a CPU with AMX. The state stays fp32
  (a bf16 state drifts over long sequences, see benchmarks/cpu_peers.py --error-by-position).
- `DifferentiableStep`: the compute-dtype products out of place, for a forward that autograd differentiates.
"""

from __future__ import annotations

import torch


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) as (B*H, N, D): a view where B and H merge, else one copy."""
    return t.flatten(0, 1)


class ComputeDtypeStep:
    """Products in the compute dtype (the decays' dtype)."""

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


class InputDtypeStep:
    """bf16 products, fp32 state (see the module docstring).

    A bf16 matmul rounds its result, so the intra- and inter-chunk parts are one product with the accumulation
    in fp32 inside it, rounded once: [(q k^T) * mask | q * lambda^(t+1)] @ [v ; S in bf16]. The scale is folded
    into the bf16 decay tables when that keeps their entries normal; otherwise the product is scaled in fp32.
    bf16 matmuls want contiguous operands: the chunk's q, k, v are copied into contiguous buffers first."""

    FOLD_SCALE = (2.0**-20, 2.0**20)  # scales folded into the tables: their entries (>= tiny) stay normal

    def __init__(self, q, k, v, o, dd, r: int, scale: float):
        B, H, _, Dk = q.shape
        Dv = v.shape[-1]
        dt = q.dtype
        self.r, self.heads = r, (B, H)
        self.q, self.k, self.v, self.o = (_flat(t) for t in (q, k, v, o))
        folded = self.FOLD_SCALE[0] <= abs(scale) <= self.FOLD_SCALE[1]
        self.scale = 1.0 if folded else scale
        self.mask = (dd.mask.view(H, r, r) * (scale if folded else 1.0)).to(dt)
        self.q_decay = (dd.q.view(H, r, 1) * (scale if folded else 1.0)).to(dt)
        self.k_decay = dd.k.view(H, r, 1).to(dt)
        self.chunk_decay = dd.chunk.view(H, 1, 1)
        new = lambda *shape, dtype=dt: torch.empty(B * H, *shape, dtype=dtype, device=q.device)  # noqa: E731
        self.qc, self.kc, self.vc = new(r, Dk), new(r, Dk), new(r, Dv)
        self.scores, self.kd, self.kv, self.out = new(r, r), new(r, Dk), new(Dk, Dv), new(r, Dv)
        self.left, self.right = new(r, r + Dk), new(r + Dk, Dv)  # [A | qd] and [v ; S]

    def __call__(self, state: torch.Tensor, s: int) -> torch.Tensor:
        B, H = self.heads
        r = self.r
        pairs = zip((self.qc, self.kc, self.vc), (self.q, self.k, self.v))
        qc, kc, vc = (buf.copy_(t[:, s : s + r]) for buf, t in pairs)
        left = self.left.view(B, H, r, -1)
        torch.bmm(qc, kc.transpose(1, 2), out=self.scores)
        torch.mul(self.scores.view(B, H, r, r), self.mask, out=left[..., :r])
        torch.mul(qc.view(B, H, r, -1), self.q_decay, out=left[..., r:])
        self.right[:, :r].copy_(vc)
        self.right[:, r:].copy_(state)
        torch.bmm(self.left, self.right, out=self.out)
        if self.scale != 1.0:
            self.o[:, s : s + r] = self.out.float().mul_(self.scale)
        else:
            self.o[:, s : s + r] = self.out
        torch.mul(kc.view(B, H, r, -1), self.k_decay, out=self.kd.view(B, H, r, -1))
        torch.bmm(self.kd.transpose(1, 2), vc, out=self.kv)
        state.view(B, H, *state.shape[1:]).mul_(self.chunk_decay)
        return state.add_(self.kv)
