"""The forward of one chunk of the chunked method, for every (batch row, head) at once; and how the tokens split
into spans of chunks (`spans`, `span_length`), shared by the backwards with a decay per head or per token.

For a chunk of r tokens starting at s, with the state S (B*H, Dk, Dv) at its start, updated in place:

    o[s:s+r] = scale * (((q k^T) * mask) v + (q * lambda^(t+1)) S)     S <- lambda^r S + (k * lambda^(r-1-t))^T v

Each product is one (B*H)-batched matmul into a buffer reused from chunk to chunk, so the state stays in cache
and nothing per chunk is allocated. The products are in the compute dtype (fp32, or fp64 for fp64 inputs); lower-
precision inputs are copied chunk by chunk into compute-dtype buffers.

bf16 products were measured and are not used: a bf16 matmul on CPU rounds its result to bf16 (PyTorch's CPU
backend has no fp32-output bf16 matmul), so the scores and their decayed copy carry one bf16 rounding each beyond
the output's own: 2.9e-3 to 4.1e-3 against the contract's 4e-3 bf16 tolerance at N = 65536 with MiniMax decays,
for about 1.3x the speed of fp32 products on a CPU with AMX (a prototype, 2026-11-30).
"""

from __future__ import annotations

import torch

from ..inputs import compute_dtype_for


def span_length(q: torch.Tensor, dv: int, chunk_size: int, span_bytes: int) -> int:
    """Tokens per span: a multiple of the chunk size such that the chunk-start states of a span, which the
    backward recomputes into one buffer, fit in `span_bytes` (at least one chunk). The forward with gradients
    keeps one state per span."""
    batch, heads, _, dk = q.shape
    state_bytes = torch.finfo(compute_dtype_for(q.dtype)).bits // 8 * batch * heads * dk * dv
    return chunk_size * max(1, span_bytes // max(state_bytes, 1))


def spans(n: int, c: int, span: int):
    """(start, stop, chunks): runs of whole chunks of c tokens, then the last partial chunk if any (chunks = 0)."""
    out = []
    for start in range(0, n - n % c, span):
        stop = min(n - n % c, start + span)
        out.append((start, stop, (stop - start) // c))
    if n % c:
        out.append((n - n % c, n, 0))
    return out


def merges(t: torch.Tensor) -> bool:
    """Whether (B, H, N, D) views as (B*H, N, D) without a copy."""
    return t.shape[0] <= 1 or t.shape[1] <= 1 or t.stride(0) == t.shape[1] * t.stride(1)


class Chunks:
    """Chunks [s, s + r) of a (B, H, N, D) tensor as (B*H, r, D) in `dtype`: views where B and H merge and the
    dtype matches; otherwise each chunk is copied into one reused buffer (never the whole tensor: a (B, N, H, D)
    projection passed transposed would otherwise be copied in full)."""

    def __init__(self, t: torch.Tensor, r: int, dtype: torch.dtype):
        self.r, self.t = r, t
        self.flat = t.flatten(0, 1) if merges(t) and t.dtype == dtype else None
        self.buffer = None
        if self.flat is None:
            self.buffer = torch.empty(t.shape[0] * t.shape[1], r, t.shape[-1], dtype=dtype, device=t.device)

    def __call__(self, s: int) -> torch.Tensor:
        if self.flat is not None:
            return self.flat[:, s : s + self.r]
        self.buffer.view(*self.t.shape[:2], self.r, -1).copy_(self.t[:, :, s : s + self.r])
        return self.buffer


class ChunkStep:
    """What every step over chunks of r tokens shares (forward and backward): the decay tables shaped per head."""

    def __init__(self, heads: tuple[int, int], dd, r: int, scale: float):
        H = heads[1]
        self.r, self.scale, self.heads = r, scale, heads
        self.mask = dd.mask.view(H, r, r)
        self.q_decay, self.k_decay = dd.q.view(H, r, 1), dd.k.view(H, r, 1)
        self.chunk_decay = dd.chunk.view(H, 1, 1)


class ComputeDtypeStep(ChunkStep):
    """Products in the compute dtype (the decays' dtype), updating the state in place."""

    def __init__(self, q, k, v, o, dd, r: int, scale: float):
        super().__init__(q.shape[:2], dd, r, scale)
        BH, Dk, Dv, cd = q.shape[0] * q.shape[1], q.shape[-1], v.shape[-1], dd.chunk.dtype
        self.o = o.flatten(0, 1)  # a new contiguous output: a view
        self.inputs = [Chunks(t, r, cd) for t in (q, k, v)]
        new = lambda d: torch.empty(BH, r, d, dtype=cd, device=q.device)  # noqa: E731
        self.scores, self.qd, self.kd, self.out = new(r), new(Dk), new(Dk), new(Dv)

    def __call__(self, state: torch.Tensor, s: int) -> torch.Tensor:
        B, H = self.heads
        r = self.r
        qc, kc, vc = (chunks(s) for chunks in self.inputs)
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


class DifferentiableStep(ChunkStep):
    """The products of ComputeDtypeStep out of place, so that autograd can differentiate the forward (a double
    backward recomputes it under autograd); slower, and it allocates per chunk."""

    def __init__(self, q, k, v, o, dd, r: int, scale: float):
        super().__init__(q.shape[:2], dd, r, scale)
        self.o = o.flatten(0, 1)
        self.sources = (q, k, v)

    def __call__(self, state: torch.Tensor, s: int) -> torch.Tensor:
        B, H = self.heads
        r = self.r
        cd = state.dtype
        qc, kc, vc = (t[:, :, s : s + r].reshape(B * H, r, -1).to(cd) for t in self.sources)
        scores = (qc @ kc.transpose(1, 2)).unflatten(0, (B, H)) * self.mask
        qd = qc.unflatten(0, (B, H)) * self.q_decay
        out = (scores.flatten(0, 1) @ vc + qd.flatten(0, 1) @ state) * self.scale
        self.o[:, s : s + r] = out
        kd = (kc.unflatten(0, (B, H)) * self.k_decay).flatten(0, 1)
        return (state.unflatten(0, (B, H)) * self.chunk_decay).flatten(0, 1) + kd.transpose(1, 2) @ vc
