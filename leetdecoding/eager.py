"""The calls as they run eagerly: validate once, let the dispatcher choose, run. The public functions
(leetdecoding.api) call these directly, or through a custom op (leetdecoding.custom_ops) under tracing."""

from __future__ import annotations

import torch

from . import dispatch, segments
from .inputs import AttentionInputs, DecodeInputs, validate, validate_decode
from .methods.base import finish
from .methods.decay_math import decay_factor, head_log_decay, state_contribution
from .methods.recurrent import step_factors


def attention(
    q, k, v, decay, log_decay, scale, method, initial_state, output_final_state, cu_seqlens, state_checkpoints,
    cu_seqlens_cpu,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """(o, the final state if output_final_state else None, the checkpoints or None) of `api.attention`."""
    x = validate(
        q, k, v, decay, log_decay, scale, initial_state, output_final_state, cu_seqlens, state_checkpoints,
        cu_seqlens_cpu,
    )  # fmt: skip
    choice = dispatch.choose(x, method)
    checkpoints = None
    if x.seq_len == 0:
        o, state = _empty_sequence(x)
        if x.checkpoints is not None:
            shape = state.shape[int(x.offsets is not None) :]
            checkpoints = torch.zeros(0, *shape, dtype=state.dtype, device=state.device)
    else:
        o, state, checkpoints = segments.run(choice.method, x, choice.options)
    return o, state if output_final_state else None, checkpoints


def _empty_sequence(x: AttentionInputs):
    """N = 0 (a rank of a sequence-parallel run may hold no tokens): o (B, H, 0, Dv) and the final state
    lambda^0 S_init (zeros without one), one row per sequence. Both are computed from the inputs as sums over no
    tokens, never allocated apart, so that they join the graph of every input that requires grad: zero-sized
    gradients for q, k, v, d initial_state = d final_state, d log_decay = 0. The state never aliases the caller's
    initial_state."""
    cd = x.compute_dtype
    q, k, v = (t.to(cd) for t in (x.q, x.k, x.v))
    if x.per_token:  # (B, H, 0) log decays: their sum over no tokens joins the graph
        o = finish(x, (q @ k.transpose(-1, -2)) @ v)
        state = (k.transpose(-1, -2) @ v + x.log_decay.sum(-1)[..., None, None]).expand(x.num_sequences, -1, -1, -1)
    else:
        o = finish(x, (q @ k.transpose(-1, -2)) @ v * decay_factor(head_log_decay(x)))
        state = state_contribution(k, v, x.log_decay).expand(x.num_sequences, -1, -1, -1)
    state = state + x.initial_state if x.initial_state is not None else state.clone()
    return o, state


def decode_inputs(q, k, v, state, decay, log_decay, scale, out_state) -> DecodeInputs:
    d = validate_decode(q, k, v, state, decay, log_decay, scale, out_state, step_factors)
    if out_state is not None and d.requires_grad:
        raise ValueError("out_state writes in place and cannot be used while an input requires grad; drop it.")
    return d


def decode_step(q, k, v, state, decay, log_decay, scale, out_state, method) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, new state) of `api.decode_step`."""
    d = decode_inputs(q, k, v, state, decay, log_decay, scale, out_state)
    return dispatch.choose_decode(d, method).method.step(d)
