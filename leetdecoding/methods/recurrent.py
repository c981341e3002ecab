"""recurrent: the causal dot product, the recurrence S_t = lambda S_{t-1} + k_t^T v_t, o_t = q_t S_t.

`step` is also the decode step: one token, the state updated in place (or into a given buffer) when no gradient
is needed, so that a server can reuse one state buffer per sequence without allocating per token.
"""

from __future__ import annotations

import torch

from ..inputs import AttentionInputs
from ..memo import ValueMemo, tracing
from . import gated
from .autograd import RecurrenceFunction
from .base import Method, elem_bytes, output_buffer, with_margin
from .decay_math import decay_factor

_FACTORS = ValueMemo()

# CPU blocking of the decode step (2 MiB of L2 per core on this project's machine): the three passes of a step
# (decay, rank-1 update, output product) run on one block of the state at a time, so that the second and third
# find it in the cache; each op splits its block between the torch threads, so a block is CACHE_BLOCK_BYTES per
# thread. H=64, D=128, fp32, per token (2026-11-30): 1 thread, B=4 2.94 -> 2.62 ms, B=16 12.4 -> 9.2 ms;
# 2 threads, 1 MiB per thread against the three whole-state passes, state time over a copy's in three interleaved
# runs: B=4 1.02 / 1.15 against 0.89 / 0.94, B=16 1.11 / 1.11 / 0.96 against 0.85 / 0.83 / 0.80 (a copy of the
# state is slower than a step there: it writes a second 64 MiB). At B=1 (a 4 MiB state, in L3) blocks were no
# faster (0.419 / 0.455 against 0.403 / 0.364 ms at 2 threads, two runs; 0.89 ms either way at 1 thread): states up
# to WHOLE_STATE_BYTES take the three passes.
# (A per-head BLAS update with lambda as beta, one pass, was tried: 6-8% slower than these blocks at B=16.)
CACHE_BLOCK_BYTES = 1 << 20
WHOLE_STATE_BYTES = 8 << 20
# Blocks only with at most this many torch threads, the counts measured; with more, whole-state passes.
MAX_THREADS = 2


def step_decay(log_decay: torch.Tensor) -> torch.Tensor:
    """lambda shaped (1, H, 1, 1) for `step`, from `log_decay`'s values at this call; remembered by those values
    (decoding asks for it every token), see leetdecoding.memo."""
    return _FACTORS.derive(log_decay, (), lambda ld: decay_factor(ld).view(1, -1, 1, 1))


def step_factors(log_decay: torch.Tensor) -> tuple[torch.Tensor]:
    """(lambda (1, H, 1, 1),) for `step`: the `derive` of a decode step's validation
    (leetdecoding.decay.canonical_log_decay), so that the decay's values are read once per call."""
    return (decay_factor(log_decay).view(1, -1, 1, 1),)


def step(state, q_t, k_t, v_t, lam, out=None):
    """One token: returns (o_t, new_state), o_t = q_t (lam S + k_t^T v_t) in the state dtype, unscaled.

    q_t, k_t (B, H, Dk), v_t (B, H, Dv) in the state dtype; lam (1, H, 1, 1), or (B, H, 1, 1) for a decay per
    sequence (a per-token decay's step). With `out` (which may be `state`
    itself) the new state is written there; otherwise a new tensor is returned. A large contiguous CPU state is
    updated block by block (see CACHE_BLOCK_BYTES).
    """
    b, h, dk, dv = state.shape
    head_bytes = dk * dv * state.element_size()
    threads = torch.get_num_threads()
    if (
        b * h * head_bytes <= max(CACHE_BLOCK_BYTES * threads, WHOLE_STATE_BYTES)
        or threads > MAX_THREADS
        or not state.is_cpu
        or not state.is_contiguous()  # a strided view of a larger cache: one pass at a time over the whole state
        or out is not None
        and not out.is_contiguous()
        or tracing()
        or torch.is_grad_enabled()
        and any(t.requires_grad for t in (state, q_t, k_t, v_t, lam))
    ):
        if out is None:
            new = torch.addcmul(state * lam, k_t.unsqueeze(-1), v_t.unsqueeze(-2))
        else:
            new = torch.mul(state, lam, out=out).addcmul_(k_t.unsqueeze(-1), v_t.unsqueeze(-2))
        o = torch.bmm(q_t.reshape(b * h, 1, dk), new.reshape(b * h, dk, dv))  # bmm: fewer dispatch layers than @
        return o.view(b, h, dv), new
    new = out if out is not None else torch.empty(b, h, dk, dv, dtype=state.dtype, device=state.device)
    n = b * h
    o = torch.empty(n, 1, dv, dtype=state.dtype, device=state.device)
    operands = (  # (B*H, ...) views, split into blocks by one call each (slicing per block costs more)
        state.view(n, dk, dv),
        new.view(n, dk, dv),
        lam.expand(b, h, 1, 1).reshape(n, 1, 1),  # lam (1, H, 1, 1) per head or (B, H, 1, 1) per sequence
        k_t.reshape(n, dk, 1),
        v_t.reshape(n, 1, dv),
        q_t.reshape(n, 1, dk),
        o,
    )
    blocks = (t.split(max(1, CACHE_BLOCK_BYTES * threads // head_bytes)) for t in operands)
    for s, s_new, lam_b, k_b, v_b, q_b, o_b in zip(*blocks):
        torch.bmm(q_b, torch.mul(s, lam_b, out=s_new).addcmul_(k_b, v_b), out=o_b)
    return o.view(b, h, dv), new


CHECKPOINT_EVERY = 64  # the forward keeps the state every this many tokens for the backward to restart from


def recurrent_fwd(q, k, v, log_decay, scale, initial_state, save, in_place=True):
    """o (input dtype), the final state, and (if save) the state before every CHECKPOINT_EVERY-th token.
    `in_place=False` allocates a state per token instead of updating one buffer: differentiable by autograd."""
    B, H, N, Dk = q.shape
    cd = log_decay.dtype
    lam = step_decay(log_decay)
    if initial_state is None:
        initial_state = torch.zeros(B, H, Dk, v.shape[-1], dtype=cd, device=q.device)
    state = initial_state
    buffer = torch.empty_like(state) if in_place else None  # updated in place: nothing per token is allocated
    o = output_buffer(q, v.shape[-1])
    saved = []
    for t in range(N):
        if save and t % CHECKPOINT_EVERY == 0:
            saved.append(state.clone())
        o_t, state = step(state, q[:, :, t].to(cd), k[:, :, t].to(cd), v[:, :, t].to(cd), lam, buffer)
        o[:, :, t] = o_t * scale if scale != 1.0 else o_t
    return o, (state.clone() if N else state), saved


def recurrent_bwd(q, k, v, log_decay, scale, saved, do, d_final, initial_state):
    """Gradients of recurrent_fwd, token by token backwards: R_t = lambda R_{t+1} + scale q_t^T do_t is the
    gradient of S_t; dq_t = scale do_t S_t^T, dk_t = R_t v_t, dv_t = R_t^T k_t. The states of each stretch of
    CHECKPOINT_EVERY tokens are recomputed from its saved start.

    d log lambda = sum over pairs s <= t (s = -1 the initial state, t = N - 1 the final state) of
    (t - s) lambda^(t-s) (q_t . k_s)(dO_t . v_s), as chunked's backward computes it with chunks of one token:
    sum_t q_t . (lambda S_{t-1} dO_t^T) (one step of every pair s < t), plus sum_s <k_s^T v_s, R'_s> +
    <S_init, R'_{-1}> (the other t - s - 1 steps), with R'_{s-1} = lambda (R'_s + lambda R_{s+1}), R'_{N-1} = 0.
    Every term is weighted by a distance >= 0, so nothing cancels (see chunked.py)."""
    B, H, N, Dk = q.shape
    cd = log_decay.dtype
    lam = step_decay(log_decay)
    grad = d_final.to(cd) if d_final is not None else torch.zeros(B, H, Dk, v.shape[-1], dtype=cd, device=q.device)
    gap = torch.zeros_like(grad)  # R'
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    d_log = torch.zeros(B, H, dtype=torch.float64, device=q.device)
    for i in reversed(range(len(saved))):
        start, stop = i * CHECKPOINT_EVERY, min(N, (i + 1) * CHECKPOINT_EVERY)
        states = [saved[i]]  # states[t - start] is the state before token t
        for t in range(start, stop):
            states.append(step(states[-1], q[:, :, t].to(cd), k[:, :, t].to(cd), v[:, :, t].to(cd), lam)[1])
        for t in reversed(range(start, stop)):
            q_t, k_t, v_t, do_t = (x[:, :, t].to(cd) for x in (q, k, v, do))
            do_t = scale * do_t
            # o_t = q_t (lambda S_{t-1} + k_t^T v_t): the carried part of dq_t apart, for d log lambda
            dq_carried = lam.squeeze(-1) * (states[t - start] @ do_t.unsqueeze(-1)).squeeze(-1)
            dq[:, :, t] = dq_carried + k_t * (v_t * do_t).sum(-1, keepdim=True)
            d_log += (q_t * dq_carried).sum(-1) + (k_t.unsqueeze(-2) @ gap @ v_t.unsqueeze(-1)).flatten(2).sum(-1)
            gap = (gap + grad) * lam  # grad is lambda R_{t+1} here
            grad = torch.addcmul(grad, q_t.unsqueeze(-1), do_t.unsqueeze(-2))
            dk[:, :, t] = (grad @ v_t.unsqueeze(-1)).squeeze(-1)
            dv[:, :, t] = (k_t.unsqueeze(-2) @ grad).squeeze(-2)
            grad = grad * lam
    if initial_state is not None:
        d_log += (initial_state * gap).sum((2, 3))
    return dq, dk, dv, d_log.sum(0).to(cd), grad


class Recurrent(Method):
    name = "recurrent"
    algorithm = "causal dot product: one state update per token"
    time_complexity = "O(N Dk Dv)"
    memory_complexity = "O(Dk Dv)"
    per_token_decay = True

    def extra_memory_bytes(self, x: AttentionInputs) -> int:
        per_head = 3 * x.dk * x.dv + 2 * (x.dk + x.dv)  # zeros, the update buffer and the final clone; a token
        if x.requires_grad:  # saved states for the backward, and one stretch of recomputed states in it
            per_head += (x.seq_len // CHECKPOINT_EVERY + 1 + CHECKPOINT_EVERY) * x.dk * x.dv
        return with_margin(elem_bytes(x) * x.batch * x.heads * per_head)

    def forward(self, x: AttentionInputs):
        if x.per_token:
            o, state = gated.recurrent(x)
        elif x.requires_grad:
            o, state = RecurrenceFunction.apply(
                x.q, x.k, x.v, x.log_decay, x.initial_state, x.scale, (recurrent_fwd, recurrent_bwd)
            )
        else:
            o, state, _ = recurrent_fwd(x.q, x.k, x.v, x.log_decay, x.scale, x.initial_state, False)
        return o, (state if x.output_final_state else None)
