"""chunked: block-based / Lightning Attention-2.

The sequence is cut into chunks of C tokens. Inside a chunk the output is exact quadratic attention with the
decay mask; across chunks a carried state S (Dk x Dv) brings in everything before:

    o_t = (q_t k_s^T * lambda^(t-s))_{s in chunk, s<=t} v_s  +  lambda^(t+1) q_t S_chunk_start
    S_next = lambda^C S_chunk_start + sum_s lambda^(C-1-s) k_s^T v_s

Chunks are processed one at a time, each product batched over every batch row and head
(leetdecoding.methods.chunk_steps, chunk_backward): working memory is a few chunk-sized buffers, not O(N).

Gradients (a custom backward: the forward keeps only the state at the start of each span of chunks, and the
backward recomputes the chunk-start states of one span at a time, then walks its chunks in reverse):
with dO = scale * do and D the gradient of the state at a chunk's end (dS_N at the end of the sequence),

    dq = ((dO v^T) * M) k + (dO * lambda^(t+1)) S_chunk_start^T
    dk = ((v dO^T) * M^T) q + (v D^T) * lambda^(C-1-s)
    dv = ((q k^T) * M)^T dO + (k * lambda^(C-1-s)) D
    D_previous_chunk = lambda^C D + (q * lambda^(t+1))^T dO,    dS_init = D before the first chunk

d log lambda is the sum, over every pair of a query (a token t, or the final state at t = N - 1) and a key (a
token s <= t, or the initial state at s = -1), of (t - s) times the pair's term lambda^(t-s) (q_t . k_s)(dO_t . v_s):
a sum of distance-weighted terms that are each O(lambda^(t-s)), so that nothing cancels (the shorter
sum_t (t+1) (q_t . dq_t - k_t . dk_t) + N <dS_N, S_N> subtracts O(1) terms to get an O(lambda) result, and loses
every digit for a small lambda). For t in a chunk starting at p and s in an earlier chunk ending at e (the initial
state ends a chunk at e = 0, the final state starts one at p = N), t - s = (t - p + 1) + (e - 1 - s) + (p - e):

    intra-chunk pairs:  sum over each chunk of (t - s) ((dO v^T) * M * (q k^T))_ts
    t - p + 1:          sum_t (t - p + 1) q_t . (dO_t lambda^(t-p+1) S_chunk_start^T)   (the inter part of dq)
    e - 1 - s:          sum_s (e - 1 - s) k_s . (lambda^(e-1-s) v_s D^T)                (the inter part of dk)
    p - e:              sum over chunks of <K, D'> + <S_init, D' before the first chunk>, K the chunk's own
                        contribution to the state, D' the gap-weighted twin of D carried back beside it:
                        D'_previous_chunk = lambda^C (D' + C D),  D' = 0 after the last chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..amp import backward_without_autocast
from ..inputs import AttentionInputs, compute_dtype_for
from ..memo import ValueMemo
from . import gated
from .autograd import twice_differentiable_grads
from .base import Method, elem_bytes, output_buffer, with_margin
from .chunk_backward import BackwardStep
from .chunk_steps import ComputeDtypeStep, DifferentiableStep, merges
from .decay_math import causal_decay_matrix, decay_factor, decay_powers


def span_length(q: torch.Tensor, dv: int, chunk_size: int, span_bytes: int) -> int:
    """Tokens per span: a multiple of the chunk size such that the chunk-start states of a span, which the
    backward recomputes into one buffer, fit in `span_bytes` (at least one chunk). The forward with gradients
    keeps one state per span."""
    batch, heads, _, dk = q.shape
    state_bytes = torch.finfo(compute_dtype_for(q.dtype)).bits // 8 * batch * heads * dk * dv
    return chunk_size * max(1, span_bytes // max(state_bytes, 1))


class Decays(NamedTuple):
    """Decay factors of a chunk of c tokens, every one exp(non-positive), shaped to broadcast over chunks."""

    mask: torch.Tensor  # (1, H, 1, c, c): lambda^(t-s) for s <= t
    distance: torch.Tensor  # (c, c): t - s for s <= t, else 0 (the weights of d log lambda's intra-chunk pairs)
    q: torch.Tensor  # (1, H, 1, c, 1): lambda^(t+1)
    k: torch.Tensor  # (1, H, 1, c, 1): lambda^(c-1-s)
    chunk: torch.Tensor  # (1, H, 1, 1): lambda^c


_DECAYS = ValueMemo()  # calls with the same decay values and chunk size share the tables (see leetdecoding.memo)


def decays(log_decay: torch.Tensor, c: int) -> Decays:
    """The tables for chunks of c tokens, computed from `log_decay`'s values at this call."""
    return _DECAYS.derive(log_decay, (c,), lambda ld: build_decays(ld, c))


def build_decays(log_decay: torch.Tensor, c: int) -> Decays:
    idx = torch.arange(c, device=log_decay.device, dtype=log_decay.dtype)
    return Decays(
        causal_decay_matrix(log_decay, c).unsqueeze(2),
        (idx[:, None] - idx[None, :]).clamp(min=0),
        decay_powers(log_decay, idx + 1).unsqueeze(2),
        decay_powers(log_decay, c - 1 - idx).unsqueeze(2),
        decay_factor(log_decay, c).view(1, -1, 1, 1),
    )


def spans(n: int, c: int, span: int):
    """(start, stop, chunks): runs of whole chunks of c tokens, then the last partial chunk if any (chunks = 0)."""
    out = []
    for start in range(0, n - n % c, span):
        stop = min(n - n % c, start + span)
        out.append((start, stop, (stop - start) // c))
    if n % c:
        out.append((n - n % c, n, 0))
    return out


def chunked_fwd(q, k, v, log_decay, scale, initial_state, chunk_size, span_bytes, save_starts):
    """o (input dtype), the final state, and (if save_starts) the state at the start of every span.

    One chunk at a time for all batch rows and heads at once (leetdecoding.methods.chunk_steps), the state
    (B*H, Dk, Dv) updated in place; `spans` only mark where the backward's saved states are taken."""
    B, H, N, Dk = q.shape
    Dv = v.shape[-1]
    cd = log_decay.dtype
    C = max(1, min(chunk_size, N))
    o = output_buffer(q, Dv)
    if initial_state is None:
        state = torch.zeros(B * H, Dk, Dv, dtype=cd, device=q.device)
    else:
        state = initial_state.reshape(B * H, Dk, Dv).clone(memory_format=torch.contiguous_format)
    saved = []
    step = None
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, log_decay, initial_state)
    )
    kind = DifferentiableStep if differentiable else ComputeDtypeStep
    for start, stop, chunks in spans(N, C, span_length(q, Dv, C, span_bytes)):
        if save_starts:
            saved.append(state.view(B, H, Dk, Dv).clone())
        r = C if chunks else stop - start  # tokens per chunk in this span
        if step is None or step.r != r:
            step = kind(q, k, v, o, decays(log_decay, r), r, scale)
        for s in range(start, stop, r):
            state = step(state, s)
    return o, state.view(B, H, Dk, Dv), saved


def chunked_bwd(
    q, k, v, log_decay, scale, saved, do, d_final, initial_state, chunk_size, span_bytes, decay_grad=True
):
    """Gradients (dq, dk, dv, d log_decay or None, d initial_state) of chunked_fwd: the spans in reverse, each
    span's chunk-start states recomputed from its saved start state, then its chunks in reverse
    (leetdecoding.methods.chunk_backward). `decay_grad=False` skips the decay's gradient (a fixed decay)."""
    B, H, N, Dk = q.shape
    Dv = v.shape[-1]
    cd = log_decay.dtype
    C = max(1, min(chunk_size, N))
    if d_final is None:
        grad = torch.zeros(B * H, Dk, Dv, dtype=cd, device=q.device)
    else:
        grad = d_final.to(cd).reshape(B * H, Dk, Dv).clone(memory_format=torch.contiguous_format)
    gap = torch.zeros_like(grad)  # D': the gap-weighted twin of grad (see the module docstring)
    dq, dk, dv = (output_buffer(t, t.shape[-1]) for t in (q, k, v))
    d_log = torch.zeros(B * H, dtype=torch.float64, device=q.device)
    plan = spans(N, C, span_length(q, Dv, C, span_bytes))
    starts = torch.empty(max([chunks for *_, chunks in plan] + [1]), B * H, Dk, Dv, dtype=cd, device=q.device)
    step = None
    for (start, stop, chunks), span_start in zip(reversed(plan), reversed(saved)):
        r = C if chunks else stop - start
        if step is None or step.r != r:
            step = BackwardStep(q, k, v, do, (dq, dk, dv), decays(log_decay, r), r, scale, decay_grad)
        g = max(chunks, 1)
        starts[0].copy_(span_start.reshape(B * H, Dk, Dv))
        for c in range(g - 1):
            step.state_after(starts[c], start + c * r, starts[c + 1])
        for c in reversed(range(g)):
            part = step(start + c * r, starts[c], grad, gap)
            if part is not None:
                d_log += part.double()
    if not decay_grad:
        return dq, dk, dv, None, grad.view(B, H, Dk, Dv)
    if initial_state is not None:  # the initial state: a chunk ending at 0, so only its gaps count
        d_log += (initial_state.reshape(B * H, Dk, Dv) * gap).sum((-1, -2)).double()
    return dq, dk, dv, d_log.view(B, H).sum(0).to(cd), grad.view(B, H, Dk, Dv)


class ChunkedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, scale, chunk_size, span_bytes):
        o, final, saved = chunked_fwd(q, k, v, log_decay, scale, initial_state, chunk_size, span_bytes, True)
        ctx.save_for_backward(q, k, v, log_decay, initial_state, *saved)
        ctx.args = (scale, chunk_size, span_bytes)
        return o, final

    @staticmethod
    @backward_without_autocast
    def backward(ctx, do, d_final):
        q, k, v, log_decay, initial_state, *saved = ctx.saved_tensors
        scale, chunk_size, span_bytes = ctx.args
        if torch.is_grad_enabled():  # create_graph=True: through the forward again, so that the graph is exact

            def forward(q, k, v, log_decay, initial_state):
                return chunked_fwd(q, k, v, log_decay, scale, initial_state, chunk_size, span_bytes, False)[:2]

            grads = twice_differentiable_grads(
                forward, (q, k, v, log_decay, initial_state), ctx.needs_input_grad[:5], (do, d_final)
            )
            return *grads, None, None, None
        dq, dk, dv, dg, ds0 = chunked_bwd(
            q, k, v, log_decay, scale, saved, do, d_final, initial_state, chunk_size, span_bytes,
            decay_grad=ctx.needs_input_grad[3],
        )
        return dq, dk, dv, dg, ds0 if ctx.needs_input_grad[4] else None, None, None, None


class Chunked(Method):
    name = "chunked"
    algorithm = "block-based / Lightning Attention-2: exact intra-chunk block + carried state"
    time_complexity = "O(N C (Dk+Dv) + N Dk Dv)"
    memory_complexity = "O(B H (Dk Dv + C^2 + C D))"
    options = ("chunk_size", "span_bytes")
    per_token_decay = True

    def extra_memory_bytes(self, x: AttentionInputs, *, chunk_size: int, span_bytes: int) -> int:
        c = max(1, min(chunk_size, x.seq_len))
        if x.per_token:  # leetdecoding.methods.gated: a chunk's products and tables, all of them kept for autograd
            chunks = -(-x.seq_len // c) if x.requires_grad else 1
            per_chunk = 4 * c * c + c * (3 * x.dk + 2 * x.dv) + 2 * x.dk * x.dv
            return with_margin(elem_bytes(x) * x.batch * x.heads * (chunks * per_chunk + x.seq_len * x.dv))
        # the forward's buffers (leetdecoding.methods.chunk_steps), for a chunk and, while the last partial chunk's
        # are made, those too: scores, decayed q and k, output; chunk copies of inputs that are not compute-dtype
        # (B*H, N, D) views
        steps = 2 if x.seq_len % c and x.seq_len > c else 1
        inputs = ((x.q, x.dk), (x.k, x.dk), (x.v, x.dv))
        copied = sum(d for t, d in inputs if t.dtype != x.compute_dtype or not merges(t))
        per_head = steps * (c * c + c * (2 * x.dk + x.dv) + c * copied) + 2 * x.dk * x.dv  # + the state and a copy
        if x.requires_grad:
            span = min(span_length(x.q, x.dv, c, span_bytes), -(-x.seq_len // c) * c)
            per_head += -(-x.seq_len // max(span, 1)) * x.dk * x.dv  # the states kept for the backward (none at N = 0)
            # the backward (leetdecoding.methods.chunk_backward): a span's recomputed chunk-start states, D and
            # D'; per chunk step: scores, their gradient and the decay's pair terms, ten chunk-sized buffers for
            # decayed inputs, products and gradients, chunk copies of q, k, v and dO
            per_head += (span // c + 2) * x.dk * x.dv
            per_head += steps * (3 * c * c + c * (6 * x.dk + 4 * x.dv) + c * (copied + x.dv))
        tables = 3 * x.heads * c * c * 8  # building a chunk's decay tables: a few (H, C, C) fp64 temporaries
        return with_margin(elem_bytes(x) * x.batch * x.heads * per_head + tables)

    def forward(self, x: AttentionInputs, *, chunk_size: int, span_bytes: int):
        if x.per_token:
            o, state = gated.forward_blocks(x, chunk_size)
            return o, (state if x.output_final_state else None)
        args = (x.scale, chunk_size, span_bytes)
        if x.requires_grad:
            o, state = ChunkedFunction.apply(x.q, x.k, x.v, x.log_decay, x.initial_state, *args)
        else:  # nothing saved
            o, state, _ = chunked_fwd(x.q, x.k, x.v, x.log_decay, x.scale, x.initial_state, *args[1:], False)
        return o, (state if x.output_final_state else None)

