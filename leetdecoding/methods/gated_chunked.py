"""chunked with per-token decays (leetdecoding.gates): a forward that keeps one state per span, and its backward.

The forward is leetdecoding.methods.gated's chunk loop without gradients (`blocks_in_place`), which also keeps the
state at the start of each span of chunks (chunk_steps.spans). The backward walks the spans in reverse, recomputes
a span's chunk-start states from its saved one, then walks its chunks in reverse with D = dL/dS at the chunk's end
(d_final after the last chunk), as leetdecoding.methods.chunked does for a decay per head. With G the cumulative
sums of a chunk's log decays (gates.Sums: every exponent <= 0, resets and shallow blocks as in the forward),
W_ts = exp(G_t - G_s) (s <= t), a_t = exp(G_t), b_s = exp(G_last - G_s), w = exp(G_last), S the state at the
chunk's start and dO = scale * do:

    dq = ((dO v^T) * W) k + (dO * a) S^T
    dk = ((dO v^T) * W)^T q + (v * b) D^T
    dv = ((q k^T) * W)^T dO + (k * b) D
    D_previous_chunk = w D + (q * a)^T dO,    dS_init = D before the first chunk

d g_u (g the log decays) is the sum of the terms of every pair of a query t (a token, or the final state) and a
key s (a token, or the initial state) with s < u <= t: each term is exp(G_t - G_s) times products, and its
exponent is the only place g_u enters. For u in a chunk the pairs split four ways, each a sum of such terms (no
O(1) terms subtracted to get a small result, as sum_{t>=u} (q_t . dq_t - k_t . dk_t) would):

    both in the chunk:           sum_{t >= u} sum_{s < u} ((q k^T) * (dO v^T) * W)_ts
    t in the chunk, s before:    sum_{t >= u} q_t . (dO_t a_t S^T)    (the inter part of dq)
    s in the chunk, t after:     sum_{s < u} k_s . (b_s v_s D^T)      (the inter part of dk)
    s before, t after:           w <S, D>

A reset (a log decay below gates.negligible) makes every factor across it exactly 0, so its own gradient is 0, as
autograd of the forward gives.
"""

from __future__ import annotations

import torch

from .base import empty_output, output_buffer
from .chunk_backward import chunks_in_reverse, state_gradient
from .chunk_steps import Chunks, span_length, spans
from .gated import BlockSums, blocks_differentiable, blocks_in_place


def gated_chunked_fwd(q, k, v, log_decay, scale, initial_state, chunk_size, span_bytes, save_starts):
    """o (input dtype), the final state and (if save_starts) the state at the start of every span; under autograd
    (a double backward recomputing the forward) differentiable, with nothing saved."""
    B, H, N, Dk = q.shape
    Dv = v.shape[-1]
    C = max(1, min(chunk_size, N))
    if initial_state is None:
        initial_state = torch.zeros(B, H, Dk, Dv, dtype=log_decay.dtype, device=q.device)
    inputs = (q, k, v, log_decay, initial_state)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return (*blocks_differentiable(*inputs, scale, C), [])
    save_at = {start for start, _, _ in spans(N, C, span_length(q, Dv, C, span_bytes))} if save_starts else ()
    return blocks_in_place(*inputs, scale, C, save_at)


def gated_chunked_bwd(
    q, k, v, log_decay, scale, saved, do, d_final, initial_state, chunk_size, span_bytes, decay_grad=True
):
    """Gradients (dq, dk, dv, d log_decay (B, H, N) in its dtype or None, d initial_state) of gated_chunked_fwd;
    `decay_grad=False` skips the decay's gradient."""
    cd = log_decay.dtype
    grad = state_gradient(d_final, q, v, cd)
    grads = [output_buffer(t, t.shape[-1]) for t in (q, k, v)]
    grads.append(empty_output(log_decay.shape, cd, q.device) if decay_grad else None)
    sums = BlockSums(log_decay, max(1, min(chunk_size, q.shape[2])))

    def make_step(r: int) -> GatedBackwardStep:
        return GatedBackwardStep(q, k, v, do, log_decay, grads, sums, r, scale)

    for step, s, start in chunks_in_reverse(q, v, saved, chunk_size, span_bytes, cd, make_step):
        step(s, start, grad)
    return (*grads, grad.view(*q.shape[:2], *grad.shape[1:]))


KERNELS = (gated_chunked_fwd, gated_chunked_bwd)  # for methods.chunked.ChunkedFunction


class GatedBackwardStep:
    """The backward of one chunk of r tokens for every (batch row, head) at once: each product one (B*H)-batched
    matmul into a buffer reused from chunk to chunk."""

    def __init__(self, q, k, v, do, log_decay, grads, sums, r: int, scale: float):
        B, H, _, Dk = q.shape
        Dv, cd = v.shape[-1], log_decay.dtype
        self.r, self.scale, self.cd, self.log_decay, self.sums = r, scale, cd, log_decay, sums
        self.inputs = [Chunks(t, r, cd) for t in (q, k, v, do)]
        self.grads = [None if t is None else t.flatten(0, 1) for t in grads]  # dq, dk, dv, dg: new, contiguous
        new = lambda *shape: torch.empty(B * H, *shape, dtype=cd, device=q.device)  # noqa: E731
        self.dos = new(r, Dv) if scale != 1.0 else None
        self.scores, self.d_scores, self.pairs = new(r, r), new(r, r), new(r, r) if grads[3] is not None else None
        self.qa, self.vb, self.dv = new(r, Dv), new(r, Dv), new(r, Dv)
        self.kb, self.dq, self.dk = new(r, Dk), new(r, Dk), new(r, Dk)
        if grads[3] is not None:
            self.q_inter, self.k_inter = new(r, Dk), new(r, Dk)
            self.later = torch.ones(r, r, dtype=torch.bool, device=q.device).tril(-1).to(cd)  # [t > j]

    def chunk(self, s: int, which=(0, 1, 2, 3)) -> list[torch.Tensor]:
        """Of q, k, v, dO (`which` of them), the chunk at s as (B*H, r, D) in the compute dtype; dO scaled."""
        out = [self.inputs[i](s) for i in which]
        if 3 in which and self.dos is not None:
            out[-1] = torch.mul(out[-1], self.scale, out=self.dos)
        return out

    def enter(self, start: int, stop: int) -> None:
        """The factors a, b, w of every chunk of the span [start, stop) at once, from one Sums over
        (B, H, chunks, r): (B*H, chunks, r, 1), (B*H, chunks, r, 1), (B*H, chunks, 1, 1) in the compute dtype."""
        sums = self.sums(self.log_decay[..., start:stop].unflatten(-1, (-1, self.r)))
        self.start = start
        self.a, self.b, self.w = (f(self.cd).flatten(0, 1).unsqueeze(-1) for f in (sums.from_start, sums.to_end,
                                                                                  sums.whole))  # fmt: skip

    def factors(self, s: int):
        """a, b, w of the chunk at s (in the span entered last), each (B*H, r or 1, 1)."""
        i = (s - self.start) // self.r
        return self.a[:, i], self.b[:, i], self.w[:, i]

    def state_after(self, state: torch.Tensor, s: int, out: torch.Tensor) -> torch.Tensor:
        """out = the state after the chunk at s, from the state at its start (the forward's update)."""
        kc, vc = self.chunk(s, (1, 2))
        _, b, w = self.factors(s)
        torch.mul(kc, b, out=self.kb)
        return torch.mul(state, w, out=out).baddbmm_(self.kb.transpose(1, 2), vc)

    def __call__(self, s: int, start: torch.Tensor, grad: torch.Tensor):
        """Writes dq, dk, dv (and d g) of the chunk at s; moves grad (D) to the chunk's start in place."""
        qc, kc, vc, dos = self.chunk(s)
        a, b, w = self.factors(s)
        W = self.sums(self.log_decay[..., s : s + self.r]).within(self.cd).flatten(0, 1)
        dg = self.grads[3]
        torch.bmm(qc, kc.transpose(1, 2), out=self.scores).mul_(W)
        torch.bmm(dos, vc.transpose(1, 2), out=self.d_scores)
        if dg is not None:  # the pair terms in the chunk: (q k^T) * W * (dO v^T)
            torch.mul(self.scores, self.d_scores, out=self.pairs)
        self.d_scores.mul_(W)
        torch.mul(dos, a, out=self.qa)
        torch.mul(vc, b, out=self.vb)
        torch.bmm(self.d_scores, kc, out=self.dq)
        torch.bmm(self.d_scores.transpose(1, 2), qc, out=self.dk)
        if dg is None:
            self.dq.baddbmm_(self.qa, start.transpose(1, 2))
            self.dk.baddbmm_(self.vb, grad.transpose(1, 2))
        else:  # the inter parts apart: the pairs with keys before the chunk, and with queries after it
            self.dq.add_(torch.bmm(self.qa, start.transpose(1, 2), out=self.q_inter))
            self.dk.add_(torch.bmm(self.vb, grad.transpose(1, 2), out=self.k_inter))
        torch.mul(kc, b, out=self.kb)
        torch.bmm(self.scores.transpose(1, 2), dos, out=self.dv).baddbmm_(self.kb, grad)
        for out, g in zip(self.grads, (self.dq, self.dk, self.dv)):
            out[:, s : s + self.r] = g
        if dg is not None:
            queries, keys = (qc * self.q_inter).sum(-1), (kc * self.k_inter).sum(-1)
            through = w.view(-1) * (start * grad).sum((-1, -2))
            dg[:, s : s + self.r] = crossing(self.pairs, queries, keys, through, self.later)
        grad.mul_(w).baddbmm_(qc.transpose(1, 2), self.qa)


def crossing(pairs, queries, keys, through, later) -> torch.Tensor:
    """d g_u for u in a chunk (B*H, r): the sum of the pair terms with s < u <= t (see the module docstring) from
    the intra-chunk pair terms `pairs` (B*H, r, r) (overwritten), each query's terms with the keys before the chunk
    `queries` (B*H, r), each key's terms with the queries after it `keys`, and the terms across the chunk
    `through` (B*H,). Every partial sum is a running sum of terms, never a difference of two sums."""
    out = queries.flip(-1).cumsum(-1).flip(-1)  # t >= u
    out[:, 1:] += keys[:, :-1].cumsum(-1)  # s < u
    out += through.unsqueeze(-1)
    pairs.cumsum_(-1)  # [t, j]: the terms of query t with the keys s <= j
    out[:, 1:] += (pairs[:, :, :-1] * later[:, :-1]).sum(-2)  # u = j + 1: the queries t > j
    return out
