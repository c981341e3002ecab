"""Public functions: validate the inputs once, normalise the decay, let the dispatcher choose, run."""

from __future__ import annotations

import torch

from . import dispatch, segments
from .amp import without_autocast
from .inputs import AttentionInputs, validate, validate_decode
from .methods import REGISTRY
from .methods.base import decay_factor, finish, head_log_decay, state_contribution
from .methods.recurrent import step, step_factors


def _empty_sequence(x: AttentionInputs):
    """N = 0 (a rank of a sequence-parallel run may hold no tokens): o (B, H, 0, Dv) and the final state
    lambda^0 S_init (zeros without one), one row per sequence. Both are computed from the inputs as sums over no
    tokens, never allocated apart, so that they join the graph of every input that requires grad: zero-sized
    gradients for q, k, v, d initial_state = d final_state, d log_decay = 0. The state never aliases the caller's
    initial_state."""
    cd = x.compute_dtype
    q, k, v = (t.to(cd) for t in (x.q, x.k, x.v))
    o = finish(x, (q @ k.transpose(-1, -2)) @ v * decay_factor(head_log_decay(x)))
    state = state_contribution(k, v, x.log_decay).expand(x.num_sequences, -1, -1, -1)
    state = state + x.initial_state if x.initial_state is not None else state.clone()
    return o, state


@without_autocast
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay=None,
    *,
    log_decay=None,
    scale: float = 1.0,
    method: str = "auto",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    state_checkpoints=None,
):
    """Exponentially decaying causal linear attention.

    o_t = scale * q_t S_t with S_t = lambda_h S_{t-1} + k_t^T v_t and S_{-1} = initial_state (zeros if None).

    q, k: (B, H, N, Dk); v: (B, H, N, Dv); strided views are fine. `decay` is lambda in (0, 1] (a float or an
    (H,) tensor), or pass `log_decay` = log lambda <= 0 (see `leetdecoding.decay` for named conventions);
    neither means lambda = 1. `method` is "auto" or a name from `list_methods()`.

    Packed variable-length batches: q, k, v of shape (1, H, T_total, D) and `cu_seqlens` (S + 1,) int32/int64
    offsets as in flash-attn's varlen API; each sequence is independent, `initial_state` and the final state are
    (S, H, Dk, Dv).

    `state_checkpoints`: increasing positions p; the state after the first p tokens is returned for each
    (positions in the packed stream with `cu_seqlens`, each belonging to the sequence of token p - 1).
    Resuming from a checkpoint with `initial_state` and running the rest equals the full call.

    `initial_state` must be in the state dtype, fp32 (fp64 for fp64 inputs): another dtype is a TypeError, never
    cast. Returns o (B, H, N, Dv) in the input dtype; then the final state (B, H, Dk, Dv) in fp32 (fp64 for fp64
    inputs) if `output_final_state`; then the checkpoints (K, B, H, Dk, Dv), or (K, H, Dk, Dv) with
    `cu_seqlens`, if `state_checkpoints` is given. More than one result comes as a tuple in that order.

    Inside `torch.autocast` the call computes exactly as outside it, in the dtype of the inputs it is given
    (see `leetdecoding.amp`).
    """
    x = validate(q, k, v, decay, log_decay, scale, initial_state, output_final_state, cu_seqlens, state_checkpoints)
    choice = dispatch.choose(x, method)
    checkpoints = None
    if x.seq_len == 0:
        o, state = _empty_sequence(x)
        if x.checkpoints is not None:
            shape = state.shape[int(x.cu_seqlens is not None) :]
            checkpoints = torch.zeros(0, *shape, dtype=state.dtype, device=state.device)
    else:
        o, state, checkpoints = segments.run(choice.method, x, choice.options)
    results = (o,) + ((state,) if output_final_state else ()) + ((checkpoints,) if checkpoints is not None else ())
    return results if len(results) > 1 else o


@without_autocast
def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    decay=None,
    *,
    log_decay=None,
    scale: float = 1.0,
    out_state: torch.Tensor | None = None,
):
    """One token of generation: q, k (B, H, Dk), v (B, H, Dv), state (B, H, Dk, Dv) in fp32 (fp64 for fp64).

    `state` and `out_state` in another dtype are a TypeError, never cast (the rule of `attention`'s initial_state).

    Returns (o (B, H, Dv) in the input dtype, new_state). The new state is a new tensor, or is written into
    `out_state` when given; `out_state=state` updates the state in place, so a server reuses one buffer.
    """
    d = validate_decode(q, k, v, state, decay, log_decay, scale, out_state, step_factors)
    cd = d.compute_dtype
    if out_state is not None and torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or state.requires_grad or d.log_decay.requires_grad
    ):
        raise ValueError("out_state writes in place and cannot be used while an input requires grad; drop it.")
    if q.device.type == "cuda":  # one fused kernel per token where Triton can run it
        from .methods import triton as triton_methods

        if not triton_methods.decode_step_reasons(q, k, v, state):
            return triton_methods.decode_step(q, k, v, state, d.log_decay, d.scale, out_state)
    (lam,) = d.derived  # from the validation's one read of the decay
    dtype = q.dtype
    if dtype != cd:
        q, k, v = q.to(cd), k.to(cd), v.to(cd)
    o, new = step(state, q, k, v, lam, out_state)
    if d.scale != 1.0:
        o = o * d.scale
    return o.to(dtype), new


@without_autocast
def explain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay=None,
    *,
    log_decay=None,
    scale: float = 1.0,
    method: str = "auto",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    state_checkpoints=None,
) -> dispatch.Explanation:
    """Which method `attention` would use for these inputs, why, and why each other method is not used.

    Prints as a readable report; the fields (`method`, `options`, `reason`, `refusals`) are there for code.
    """
    x = validate(q, k, v, decay, log_decay, scale, initial_state, output_final_state, cu_seqlens, state_checkpoints)
    return dispatch.explain(x, method)


def list_methods() -> list[dict]:
    """Every method with its backend, devices, dtypes, complexity and grad / state / varlen support."""
    return [m.info() for m in REGISTRY.values()]
