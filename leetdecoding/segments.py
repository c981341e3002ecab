"""Runs any method over segments of the sequence, chaining the state: packed variable-length batches
(`cu_seqlens`) and state checkpoints. One mechanism for every method, exact by construction: a segment starts
from the state the previous segment left, exactly as one call would carry it.

Words: a *segment* is the tokens between two cuts (a sequence start of `cu_seqlens`, a checkpoint), run as one
method call; a *span* is a group of chunks inside the chunked method (leetdecoding.methods.chunked); a *chunk*
is the unit of the chunked algorithms.

Every method call goes through `forward` here, which also keeps outputs causal when k or v hold NaN or inf:
o_t depends only on tokens <= t, whatever the later tokens hold (garbage in right padding is a real case).
A matmul-based method cannot promise that by itself: a later v_s = NaN times the score 0 (masked, or a decay
factor flushed to 0) is NaN inside a matmul, and so is 0 * NaN in a masked product, so a non-finite token
spoils the earlier rows of its block. Rather than slow every method down with masking that NaN survives
anyway, the result is checked (one pass over the output, skipped while torch.compile traces) and, only when it
holds a non-finite value and k or v (or the initial state) do too, recomputed in two parts: the tokens before
the first non-finite k or v with the method (exact: its inputs are finite there), the rest with `recurrent` from
the state they leave, which follows the reference recurrence step by step and so gives its NaN / inf pattern.
"""

from __future__ import annotations

import dataclasses

import torch

from .gates import negligible
from .inputs import AttentionInputs
from .memo import tracing
from .methods.autograd import PlainAutogradFence
from .methods.base import Method, new_output, zero_states
from .methods.recurrent import Recurrent

RECURRENT = Recurrent()


def run(method: Method, x: AttentionInputs, options: dict):
    """Returns (o, final_state or None, checkpoints or None)."""
    resets = _reset_cuts(x)
    if x.checkpoints is None and not resets and (x.offsets is None or method.native_varlen):
        if x.offsets is None:
            o, state = forward(method, x, options)
            return o, state, None
        o, state = _call(method, x, options)
        if not _suspect(x, o, state):
            return o, state, None
        # packed sequences with a non-finite output: repaired one sequence at a time by the loop below
    sequences = [(0, x.seq_len)] if x.offsets is None else list(zip(x.offsets, x.offsets[1:]))
    cuts = set(x.checkpoints or ())
    saved: dict[int, torch.Tensor] = {}
    finals = []
    o = new_output(x)
    for i, (start, end) in enumerate(sequences):
        if x.initial_state is None:
            state = None
        else:
            state = x.initial_state if x.offsets is None else x.initial_state[i : i + 1]
        bounds = [start, *sorted(p for p in cuts | resets if start < p < end), end]
        for a, b in zip(bounds, bounds[1:]):
            keep = b < end or b in cuts or x.output_final_state
            if a == b:
                continue
            segment = x.segment(a, b, state, keep)
            out, state = forward(method, _through_reset(x, segment, a) if a in resets else segment, options)
            o[:, :, a:b] = out
            if b in cuts:
                saved[b] = state
        if state is None or start == end:
            state = _empty_state(x) if state is None else state.clone()
        finals.append(state)
    final = (finals[0] if x.offsets is None else torch.cat(finals)) if x.output_final_state else None
    checkpoints = None
    if x.checkpoints is not None:
        shape = (x.heads, x.dk, x.dv) if x.offsets is not None else (x.batch, x.heads, x.dk, x.dv)
        rows = [saved[p] if x.offsets is None else saved[p][0] for p in x.checkpoints]
        checkpoints = torch.stack(rows) if rows else torch.zeros((0, *shape), dtype=x.compute_dtype, device=x.device)
    return o, final, checkpoints


def _reset_cuts(x: AttentionInputs) -> set[int]:
    """The tokens where a per-token decay given as lambda (AttentionInputs.reset_decay) is a reset in some row and
    head: the segments start there (`_through_reset`)."""
    if x.reset_decay is None:
        return set()
    reset = (x.log_decay < negligible(x.log_decay.dtype)).flatten(0, 1).any(0)
    return set(torch.nonzero(reset).flatten().tolist())


def _through_reset(x: AttentionInputs, segment: AttentionInputs, a: int) -> AttentionInputs:
    """The segment starting at token a with lambda_a moved from its decays into its initial state: S_a = 1 *
    (lambda_a S_{a-1}) + k_a^T v_a, the recurrence itself, now with lambda_a's gradient <dL/dS_a, S_{a-1}> through
    the product (the methods count a reset as an exact 0 and give its log decay a zero gradient)."""
    start = segment.initial_state if segment.initial_state is not None else zero_states(segment, segment.batch)
    g = segment.log_decay
    return dataclasses.replace(
        segment,
        initial_state=x.reset_decay[:, :, a, None, None] * start,
        log_decay=torch.cat([torch.zeros_like(g[..., :1]), g[..., 1:]], dim=-1),
    )


def _empty_state(x: AttentionInputs) -> torch.Tensor:
    return zero_states(x, 1 if x.offsets is not None else x.batch)


def forward(method: Method, x: AttentionInputs, options: dict):
    """method.forward(x) for a plain (not packed) problem, kept causal when k or v hold NaN or inf (see above)."""
    o, state = _call(method, x, options)
    if not _suspect(x, o, state):
        return o, state
    first = _first_non_finite_token(x)
    if first is None:  # the inputs are finite: the non-finite values are the method's own (or initial_state's)
        return o, state
    state = x.initial_state
    parts = []
    if first > 0:
        head, state = _call(method, x.segment(0, first, state, True), options)
        parts.append(head)
    tail, state = RECURRENT.forward(x.segment(first, x.seq_len, state, x.output_final_state))
    parts.append(tail)
    return torch.cat(parts, dim=2), state


def _call(method: Method, x: AttentionInputs, options: dict):
    """method.forward(x); a method differentiated by plain autograd runs inside one autograd node whose backward
    computes with autocast off, as the custom backwards do (see methods.autograd.PlainAutogradFence)."""
    if not (method.plain_autograd and x.requires_grad) or tracing():
        return method.forward(x, **options)

    def run(q, k, v, log_decay, initial_state):
        o, state = method.forward(
            dataclasses.replace(x, q=q, k=k, v=v, log_decay=log_decay, initial_state=initial_state), **options
        )
        return (o,) if state is None else (o, state)

    out = PlainAutogradFence.apply(run, x.q, x.k, x.v, x.log_decay, x.initial_state)
    return out[0], (out[1] if len(out) > 1 else None)


def _suspect(x: AttentionInputs, o: torch.Tensor, state: torch.Tensor | None) -> bool:
    """Whether the result holds a non-finite value while k or v do. The output is summed in its own dtype (torch
    accumulates a bf16 or fp16 sum in fp32 without a converted copy of the output; a sum that overflows only costs
    the second check). Skipped while a graph is recorded (torch.compile needs the
    value: a graph break, or no fullgraph compile at all; torch.jit.trace would bake the branch in) and while a
    CUDA graph is captured (a sync is not allowed there): compiled and captured calls get the method's own
    result, exact for finite inputs."""
    if tracing():
        return False
    if o.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    with torch.no_grad():
        total = o.sum()
        if state is not None:
            total = total + state.sum()
        if bool(torch.isfinite(total)):
            return False
        inputs = (x.k, x.v) if x.initial_state is None else (x.k, x.v, x.initial_state)
        return not all(bool(torch.isfinite(t).all()) for t in inputs)


def _first_non_finite_token(x: AttentionInputs) -> int | None:
    """The first position t at which k_t or v_t holds NaN or inf in any batch row or head, or None; 0 when the
    initial state does (a method's own arithmetic, e.g. inf * 0 for a factor 0, differs from the recurrence's)."""
    with torch.no_grad():
        if x.initial_state is not None and not bool(torch.isfinite(x.initial_state).all()):
            return 0
        bad = ~(torch.isfinite(x.k).all(-1) & torch.isfinite(x.v).all(-1)).flatten(0, 1).all(0)
        idx = bad.nonzero()
    return int(idx[0, 0]) if idx.numel() else None
