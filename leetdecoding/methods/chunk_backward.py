"""The backward of one chunk of the chunked method, for every (batch row, head) at once, chunks in reverse.

With dO = scale * do, S the state at the chunk's start (recomputed from the span's saved start state), D the
gradient of the state at the chunk's end and D' its gap-weighted twin (leetdecoding.methods.chunked's docstring
has the derivation), for a chunk of r tokens:

    dA = (dO v^T) * mask           A = (q k^T) * mask
    dq = dA k + (dO * lambda^(t+1)) S^T
    dk = dA^T q + (v D^T) * lambda^(r-1-s)
    dv = A^T dO + (k * lambda^(r-1-s)) D
    D' <- lambda^r (D' + r D),     D <- lambda^r D + q^T (dO * lambda^(t+1))

and, only when the decay needs a gradient, the chunk's distance-weighted terms of d log lambda. Every product is
one (B*H)-batched matmul into a buffer reused from chunk to chunk; D, D' and the states stay in cache.
"""

from __future__ import annotations

import torch

from .chunk_steps import Chunks, ChunkStep, span_length, spans


def state_gradient(d_final, q: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """D after the last chunk: the final state's gradient as a new (B*H, Dk, Dv) tensor in `dtype` (zeros for
    None), which the backward moves back chunk by chunk in place."""
    B, H, _, Dk = q.shape
    if d_final is None:
        return torch.zeros(B * H, Dk, v.shape[-1], dtype=dtype, device=q.device)
    return d_final.to(dtype).reshape(B * H, Dk, -1).clone(memory_format=torch.contiguous_format)


def chunks_in_reverse(q, v, saved, chunk_size: int, span_bytes: int, dtype: torch.dtype, make_step):
    """(step, s, the state at s) for every chunk in reverse, s its first token: the spans (chunk_steps.spans) in
    reverse, each span's chunk-start states recomputed from its saved start state `saved[i]` by
    `step.state_after` into one buffer, after `step.enter(start, stop)`. `make_step(r)` makes the step for chunks
    of r tokens (remade when r changes: the last partial chunk)."""
    B, H, N, Dk = q.shape
    Dv = v.shape[-1]
    C = max(1, min(chunk_size, N))
    plan = spans(N, C, span_length(q, Dv, C, span_bytes))
    starts = torch.empty(max([chunks for *_, chunks in plan] + [1]), B * H, Dk, Dv, dtype=dtype, device=q.device)
    step = None
    for (start, stop, chunks), span_start in zip(reversed(plan), reversed(saved)):
        r = C if chunks else stop - start
        if step is None or step.r != r:
            step = make_step(r)
        step.enter(start, stop)
        starts[0].copy_(span_start.reshape(B * H, Dk, Dv))
        for c in range(max(chunks, 1) - 1):
            step.state_after(starts[c], start + c * r, starts[c + 1])
        for c in reversed(range(max(chunks, 1))):
            yield step, start + c * r, starts[c]


class BackwardStep(ChunkStep):
    def __init__(self, q, k, v, do, grads, dd, r: int, scale: float, decay_grad: bool):
        super().__init__(q.shape[:2], dd, r, scale)
        B, H, _, Dk = q.shape
        Dv = v.shape[-1]
        cd = dd.chunk.dtype
        self.decay_grad = decay_grad
        self.inputs = [Chunks(t, r, cd) for t in (q, k, v, do)]
        self.grads = [t.flatten(0, 1) for t in grads]  # dq, dk, dv: new and contiguous (views), written by chunk
        new = lambda *shape: torch.empty(B * H, *shape, dtype=cd, device=q.device)  # noqa: E731
        self.dos = new(r, Dv) if scale != 1.0 else None
        self.scores, self.d_scores, self.qdo, self.kd = new(r, r), new(r, r), new(r, Dv), new(r, Dk)
        self.dq, self.dk, self.dv, self.vd = new(r, Dk), new(r, Dk), new(r, Dv), new(r, Dv)
        if decay_grad:
            idx = torch.arange(r, device=q.device, dtype=cd)
            self.mask_distance = self.mask * dd.distance  # the intra-chunk pairs' weights t - s
            self.q_weight, self.k_weight = (idx + 1).view(r, 1), (r - 1 - idx).view(r, 1)
            self.dq_inter, self.dk_inter, self.pairs, self.vg = new(r, Dk), new(r, Dk), new(r, r), new(r, Dk)

    def enter(self, start: int, stop: int) -> None:
        """A span's chunks come next: nothing to prepare (the decay tables are the same for every chunk)."""

    def chunk(self, s: int, which=(0, 1, 2, 3)) -> list[torch.Tensor]:
        """Of q, k, v, dO (`which` of them), the chunk at s as (B*H, r, D) in the compute dtype; dO scaled."""
        out = []
        for i in which:
            t = self.inputs[i](s)
            if i == 3 and self.dos is not None:
                t = torch.mul(t, self.scale, out=self.dos)
            out.append(t)
        return out

    def __call__(self, s: int, start: torch.Tensor, grad: torch.Tensor, gap: torch.Tensor):
        """Writes dq, dk, dv of the chunk at s; moves grad (D) and gap (D') to the chunk's start in place.
        Returns the chunk's share of d log lambda, (B*H,) in the compute dtype, or None without decay_grad."""
        B, H = self.heads
        r = self.r
        qc, kc, vc, dos = self.chunk(s)
        heads = lambda t: t.view(B, H, *t.shape[1:])  # noqa: E731
        torch.bmm(qc, kc.transpose(1, 2), out=self.scores)
        torch.bmm(dos, vc.transpose(1, 2), out=self.d_scores)
        d_log = None
        if self.decay_grad:  # pairs (t, s) in the chunk, weight t - s
            torch.mul(self.scores, self.d_scores, out=self.pairs)
            d_log = heads(self.pairs).mul_(self.mask_distance).sum((-1, -2)).flatten()
        heads(self.scores).mul_(self.mask)
        heads(self.d_scores).mul_(self.mask)
        torch.mul(heads(dos), self.q_decay, out=heads(self.qdo))
        torch.bmm(self.d_scores, kc, out=self.dq)
        if self.decay_grad:  # the inter part of dq separately: its pairs with the state, weight t - p + 1
            torch.bmm(self.qdo, start.transpose(1, 2), out=self.dq_inter)
            d_log += (qc * self.dq_inter * self.q_weight).sum((-1, -2))
            self.dq.add_(self.dq_inter)
        else:
            self.dq.baddbmm_(self.qdo, start.transpose(1, 2))
        torch.bmm(self.d_scores.transpose(1, 2), qc, out=self.dk)
        torch.mul(heads(vc), self.k_decay, out=heads(self.vd))  # (v * lambda^(r-1-s)) D^T = (v D^T) * ...
        if self.decay_grad:  # the inter part of dk separately: pairs with later chunks, weight e - 1 - s
            dk_inter = torch.bmm(self.vd, grad.transpose(1, 2), out=self.dk_inter)
            d_log += (kc * dk_inter * self.k_weight).sum((-1, -2))
            self.dk.add_(dk_inter)
        else:
            self.dk.baddbmm_(self.vd, grad.transpose(1, 2))
        torch.mul(heads(kc), self.k_decay, out=heads(self.kd))
        torch.bmm(self.scores.transpose(1, 2), dos, out=self.dv)
        self.dv.baddbmm_(self.kd, grad)
        for out, g in zip(self.grads, (self.dq, self.dk, self.dv)):
            out[:, s : s + r] = g
        if self.decay_grad:  # the chunk's own contribution to the state against D', weight p - e
            torch.bmm(vc, gap.transpose(1, 2), out=self.vg)
            d_log += (self.kd * self.vg).sum((-1, -2))
            gap.add_(grad, alpha=r)
            heads(gap).mul_(self.chunk_decay)
        heads(grad).mul_(self.chunk_decay)
        grad.baddbmm_(qc.transpose(1, 2), self.qdo)
        return d_log

    def state_after(self, state: torch.Tensor, s: int, out: torch.Tensor) -> torch.Tensor:
        """out = the state after the chunk at s, from the state at its start (the forward's update)."""
        B, H = self.heads
        kc, vc = self.chunk(s, (1, 2))
        torch.mul(kc.view(B, H, self.r, -1), self.k_decay, out=self.kd.view(B, H, self.r, -1))
        torch.mul(state.view(B, H, *state.shape[1:]), self.chunk_decay, out=out.view(B, H, *out.shape[1:]))
        return out.baddbmm_(self.kd.transpose(1, 2), vc)
