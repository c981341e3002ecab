"""Runs any method over pieces of the sequence, chaining the state: packed variable-length batches
(`cu_seqlens`) and state checkpoints. One mechanism for every method, exact by construction: a piece starts
from the state the previous piece left, exactly as one call would carry it."""

from __future__ import annotations

import torch

from .inputs import AttentionInputs
from .methods.base import Method, new_output


def run(method: Method, x: AttentionInputs, options: dict):
    """Returns (o, final_state or None, checkpoints or None)."""
    if x.checkpoints is None and (x.cu_seqlens is None or method.native_varlen):
        o, state = method.forward(x, **options)
        return o, state, None
    sequences = [(0, x.seq_len)] if x.cu_seqlens is None else list(zip(x.cu_seqlens, x.cu_seqlens[1:]))
    cuts = set(x.checkpoints or ())
    saved: dict[int, torch.Tensor] = {}
    finals = []
    o = new_output(x)
    for i, (start, end) in enumerate(sequences):
        if x.initial_state is None:
            state = None
        else:
            state = x.initial_state if x.cu_seqlens is None else x.initial_state[i : i + 1]
        bounds = [start, *sorted(p for p in cuts if start < p < end), end]
        for a, b in zip(bounds, bounds[1:]):
            keep = b < end or b in cuts or x.output_final_state
            if a == b:
                continue
            out, state = method.forward(x.piece(a, b, state, keep), **options)
            o[:, :, a:b] = out
            if b in cuts:
                saved[b] = state
        if state is None or start == end:
            state = _empty_state(x) if state is None else state.clone()
        finals.append(state)
    final = (finals[0] if x.cu_seqlens is None else torch.cat(finals)) if x.output_final_state else None
    checkpoints = None
    if x.checkpoints is not None:
        shape = (x.heads, x.dk, x.dv) if x.cu_seqlens is not None else (x.batch, x.heads, x.dk, x.dv)
        rows = [saved[p] if x.cu_seqlens is None else saved[p][0] for p in x.checkpoints]
        checkpoints = torch.stack(rows) if rows else torch.zeros((0, *shape), dtype=x.compute_dtype, device=x.device)
    return o, final, checkpoints


def _empty_state(x: AttentionInputs) -> torch.Tensor:
    rows = 1 if x.cu_seqlens is not None else x.batch
    return torch.zeros(rows, x.heads, x.dk, x.dv, dtype=x.compute_dtype, device=x.device)
