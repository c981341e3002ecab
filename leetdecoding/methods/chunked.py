"""chunked: block-based / Lightning Attention-2.

The sequence is cut into chunks of C tokens. Inside a chunk the output is exact quadratic attention with the
decay mask; across chunks a carried state S (Dk x Dv) brings in everything before:

    o_t = (q_t k_s^T * lambda^(t-s))_{s in chunk, s<=t} v_s  +  lambda^(t+1) q_t S_chunk_start
    S_next = lambda^C S_chunk_start + sum_s lambda^(C-1-s) k_s^T v_s

Chunks are processed one at a time, each product batched over every batch row and head
(leetdecoding.methods.chunk_steps, chunk_backward): working memory is a few chunk-sized buffers, not O(N).

Per-token decays take the same chunk loop with the cumulative sums of leetdecoding.gates (leetdecoding.methods.gated,
and gated_chunked for its backward, through the same ChunkedFunction).

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
from ..inputs import AttentionInputs
from ..memo import ValueMemo
from . import gated, gated_chunked
from .autograd import twice_differentiable_grads
from .base import Method, elem_bytes, output_buffer, with_margin
from .chunk_backward import BackwardStep, chunks_in_reverse, state_gradient
from .chunk_steps import ComputeDtypeStep, DifferentiableStep, merges, span_length, spans
from .decay_math import causal_decay_matrix, decay_factor, decay_powers


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
    B, H, _, Dk = q.shape
    Dv = v.shape[-1]
    cd = log_decay.dtype
    grad = state_gradient(d_final, q, v, cd)
    gap = torch.zeros_like(grad)  # D': the gap-weighted twin of grad (see the module docstring)
    dq, dk, dv = (output_buffer(t, t.shape[-1]) for t in (q, k, v))
    d_log = torch.zeros(B * H, dtype=torch.float64, device=q.device)

    def make_step(r: int) -> BackwardStep:
        return BackwardStep(q, k, v, do, (dq, dk, dv), decays(log_decay, r), r, scale, decay_grad)

    for step, s, start in chunks_in_reverse(q, v, saved, chunk_size, span_bytes, cd, make_step):
        part = step(s, start, grad, gap)
        if part is not None:
            d_log += part.double()
    if not decay_grad:
        return dq, dk, dv, None, grad.view(B, H, Dk, Dv)
    if initial_state is not None:  # the initial state: a chunk ending at 0, so only its gaps count
        d_log += (initial_state.reshape(B * H, Dk, Dv) * gap).sum((-1, -2)).double()
    return dq, dk, dv, d_log.view(B, H).sum(0).to(cd), grad.view(B, H, Dk, Dv)


KERNELS = (chunked_fwd, chunked_bwd)  # a decay per head; leetdecoding.methods.gated_chunked.KERNELS per token


class ChunkedFunction(torch.autograd.Function):
    """The chunked method with its own backward. `kernels` = (fwd, bwd) with chunked_fwd's and chunked_bwd's
    signatures: KERNELS for a decay per head, gated_chunked.KERNELS for per-token decays. Under create_graph=True
    the backward differentiates fwd again (fwd computes under autograd then), so that second derivatives are
    exact."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, scale, chunk_size, span_bytes, kernels=KERNELS):
        o, final, saved = kernels[0](q, k, v, log_decay, scale, initial_state, chunk_size, span_bytes, True)
        ctx.save_for_backward(q, k, v, log_decay, initial_state, *saved)
        ctx.args = (scale, chunk_size, span_bytes)
        ctx.kernels = kernels
        return o, final

    @staticmethod
    @backward_without_autocast
    def backward(ctx, do, d_final):
        q, k, v, log_decay, initial_state, *saved = ctx.saved_tensors
        scale, chunk_size, span_bytes = ctx.args
        fwd, bwd = ctx.kernels
        if torch.is_grad_enabled():  # create_graph=True: through the forward again, so that the graph is exact

            def forward(q, k, v, log_decay, initial_state):
                return fwd(q, k, v, log_decay, scale, initial_state, chunk_size, span_bytes, False)[:2]

            grads = twice_differentiable_grads(
                forward, (q, k, v, log_decay, initial_state), ctx.needs_input_grad[:5], (do, d_final)
            )
            return *grads, None, None, None, None
        dq, dk, dv, dg, ds0 = bwd(
            q, k, v, log_decay, scale, saved, do, d_final, initial_state, chunk_size, span_bytes,
            decay_grad=ctx.needs_input_grad[3],
        )
        return dq, dk, dv, dg, ds0 if ctx.needs_input_grad[4] else None, None, None, None, None


class Chunked(Method):
    name = "chunked"
    algorithm = "block-based / Lightning Attention-2: exact intra-chunk block + carried state"
    time_complexity = "O(N C (Dk+Dv) + N Dk Dv)"
    memory_complexity = "O(B H (Dk Dv + C^2 + C D))"
    options = ("chunk_size", "span_bytes")
    per_token_decay = True

    def extra_memory_bytes(self, x: AttentionInputs, *, chunk_size: int, span_bytes: int) -> int:
        c = max(1, min(chunk_size, x.seq_len))
        # two steps' buffers while the last partial chunk's are made; chunk copies of inputs that are not
        # compute-dtype (B*H, N, D) views
        steps = 2 if x.seq_len % c and x.seq_len > c else 1
        inputs = ((x.q, x.dk), (x.k, x.dk), (x.v, x.dv))
        copied = sum(d for t, d in inputs if t.dtype != x.compute_dtype or not merges(t))
        if x.per_token:
            return _per_token_bytes(x, c, steps, copied, span_bytes)
        # the forward's buffers (leetdecoding.methods.chunk_steps): scores, decayed q and k, output
        per_head = steps * (c * c + c * (2 * x.dk + x.dv) + c * copied) + 2 * x.dk * x.dv  # + the state and a copy
        if x.requires_grad:
            per_head += _backward_states(x, c, span_bytes)
            # the backward (leetdecoding.methods.chunk_backward), D' and per chunk step: scores, their gradient and
            # the decay's pair terms, ten chunk-sized buffers for decayed inputs, products and gradients, chunk
            # copies of q, k, v and dO
            per_head += x.dk * x.dv + steps * (3 * c * c + c * (6 * x.dk + 4 * x.dv) + c * (copied + x.dv))
        tables = 3 * x.heads * c * c * 8  # building a chunk's decay tables: a few (H, C, C) fp64 temporaries
        return with_margin(elem_bytes(x) * x.batch * x.heads * per_head + tables)

    def forward(self, x: AttentionInputs, *, chunk_size: int, span_bytes: int):
        args = (x.scale, chunk_size, span_bytes)
        if x.requires_grad:
            kernels = gated_chunked.KERNELS if x.per_token else KERNELS
            o, state = ChunkedFunction.apply(x.q, x.k, x.v, x.log_decay, x.initial_state, *args, kernels)
        elif x.per_token:
            o, state = gated.forward_blocks(x, chunk_size)
        else:  # nothing saved
            o, state, _ = chunked_fwd(x.q, x.k, x.v, x.log_decay, x.scale, x.initial_state, *args[1:], False)
        return o, (state if x.output_final_state else None)


def _backward_states(x: AttentionInputs, c: int, span_bytes: int) -> int:
    """(Dk, Dv) states per head that chunked keeps for its backward: one per span (none at N = 0), and in the
    backward a span's recomputed chunk-start states and D."""
    span = min(span_length(x.q, x.dv, c, span_bytes), -(-x.seq_len // c) * c)
    return (-(-x.seq_len // max(span, 1)) + span // c + 1) * x.dk * x.dv


def _per_token_bytes(x: AttentionInputs, c: int, steps: int, copied: int, span_bytes: int) -> int:
    """extra_memory_bytes with per-token decays (leetdecoding.methods.gated_chunked). The forward makes one chunk's
    tensors at a time: the scores, the factors exp(G_t - G_s) in the compute dtype beside the three fp64 (c, c)
    tables they come from (differences, masked, exp), decayed q and k, the output, input copies; the state and its
    copy. With gradients, the states kept for the backward, and the backward's per chunk step: scores, their
    gradient, the pair terms and a temporary of their sums, nine chunk-sized buffers, input copies (the factor
    tables as in the forward)."""
    per_head = 2 * c * c + c * (2 * x.dk + x.dv + copied) + 2 * x.dk * x.dv
    if x.requires_grad:
        per_head += _backward_states(x, c, span_bytes) + steps * (4 * c * c + c * (5 * x.dk + 4 * x.dv + copied + x.dv))
    return with_margin(x.batch * x.heads * (elem_bytes(x) * per_head + 24 * c * c))
