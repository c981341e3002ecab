"""fla's entry points for decaying linear attention, computed by leetdecoding: fla's names, layout and conventions.

Code written for fla (fla-org/flash-linear-attention) ports by changing its import, on CPU and on GPU:

    # from fla.ops.simple_gla import chunk_simple_gla
    from leetdecoding.compat.fla import chunk_simple_gla
    o, final_state = chunk_simple_gla(q, k, v, g=g, initial_state=h0, output_final_state=True)

The conventions are fla's (fla/ops/simple_gla, fla/ops/retention, fla/ops/lightning_attn):
- q, k: (B, T, H, K); v: (B, T, H, V); with `cu_seqlens`, B = 1 and the sequences are packed along T. They reach
  `leetdecoding.attention` as views (`q.transpose(1, 2)`), never copied.
- g: (B, T, H) log gates, log lambda_t <= 0: S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t, so exp(g_0)
  multiplies initial_state. g_gamma: (H,), one log decay per head. Neither: no decay.
- scale=None means K^-0.5 (K = k.shape[-1]).
- States (N, H, K, V) ((N, H, V, K) with `state_v_first=True`), N = B or the number of sequences of `cu_seqlens`.
- Every call returns (o (B, T, H, V) in the input dtype, contiguous, final_state or None).

Where this differs from fla: states are fp32 (fp64 for fp64 inputs) and an `initial_state` in another dtype is a
TypeError, never cast (leetdecoding's rule for states); fp64 inputs get fp64 decays and results where fla forms its
decays in fp32; `chunk_size` is accepted and checked as fla checks it, but the dispatcher chooses the method and its
chunk (every method computes the same operator); `head_first=True` and `reverse=True` are refused with a hint.
Gradients flow to q, k, v, g and initial_state (g_gamma too, when it requires grad).
"""

from __future__ import annotations

import torch

from .. import decay
from ..api import attention

__all__ = ["chunk_simple_gla", "fused_recurrent_simple_gla", "chunk_retention", "chunk_lightning_attn"]


def chunk_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    head_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla.ops.simple_gla.chunk_simple_gla: decaying linear attention with per-token log gates `g` (B, T, H) or
    per-head log decays `g_gamma` (H,) (see the module's docstring for the conventions).

    `cu_seqlens_cpu` (the offsets on the host) saves a device read, as in fla.

    Raises:
        TypeError / ValueError: a bad argument, named as fla names it (g, g_gamma, q, initial_state, ...).
    """
    _check_chunk_options(chunk_size, head_first)
    return _simple_gla(
        q, k, v, g, g_gamma, scale, initial_state, output_final_state, state_v_first, cu_seqlens, cu_seqlens_cpu
    )


def fused_recurrent_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla.ops.simple_gla.fused_recurrent_simple_gla: the same operator as `chunk_simple_gla` (fla's recurrent
    kernel; here the dispatcher chooses the method, as for every entry point). `reverse=True` is refused.

    Raises:
        TypeError / ValueError: a bad argument, named as fla names it.
    """
    if reverse:
        raise ValueError(
            "reverse=True (the recurrence from the last token to the first) is not supported; got reverse=True. "
            "Hint: without cu_seqlens, flip q, k, v and g along T (x.flip(1)), call with reverse=False and flip o back."
        )
    return _simple_gla(q, k, v, g, g_gamma, scale, initial_state, output_final_state, state_v_first, cu_seqlens, None)


def chunk_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    head_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla.ops.retention.chunk_retention: RetNet's per-head decays, log lambda_h = log(1 - 2^(-5-h)) for
    h = 0..H-1 (`leetdecoding.decay.retnet`).

    Raises:
        TypeError / ValueError: a bad argument, named as fla names it.
    """
    _check_chunk_options(chunk_size, head_first)
    heads = _check_qkv(q, k, v, cu_seqlens)[2]
    log_decay = decay.retnet(heads, dtype=_decay_dtype(q))
    return _attention(q, k, v, log_decay, "the retention decay", scale, initial_state, output_final_state, cu_seqlens)


def chunk_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_idx: int,
    num_layers: int,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    head_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla.ops.lightning_attn.chunk_lightning_attn: fla's per-layer decays, log lambda_h =
    -(8 / H) (1 - layer_idx / num_layers) h for h = 0..H-1 (`leetdecoding.decay.fla_lightning`; not
    TransNormerLLM's slopes, `leetdecoding.decay.transnormer`).

    Raises:
        TypeError / ValueError: a bad argument, named as fla names it (layer_idx in [0, num_layers)).
    """
    _check_chunk_options(chunk_size, head_first)
    heads = _check_qkv(q, k, v, cu_seqlens)[2]
    log_decay = decay.fla_lightning(heads, layer_idx, num_layers, dtype=_decay_dtype(q))
    return _attention(q, k, v, log_decay, "the lightning decay", scale, initial_state, output_final_state, cu_seqlens)


# ----- shared by the entry points -----


def _simple_gla(q, k, v, g, g_gamma, scale, initial_state, output_final_state, state_v_first, cu_seqlens, cu_cpu):
    """The simple_gla entry points after their own options: g or g_gamma as the log decay, checked in fla's names."""
    batch, length, heads, _ = _check_qkv(q, k, v, cu_seqlens)
    if g is not None and g_gamma is not None:
        raise ValueError(
            "pass either g (per-token log gates) or g_gamma (per-head log decays), not both; got both. "
            "Hint: for both, pass g=g + g_gamma (their decays multiply)."
        )
    if g is not None:
        _check_shape("g", g, (batch, length, heads), "(B, T, H): one log gate per token and head")
        log_decay, name = g.transpose(1, 2), "g"  # (B, H, T), the per-token log decay of leetdecoding.attention
    else:
        if g_gamma is not None:
            _check_shape("g_gamma", g_gamma, (heads,), "(H,): one log decay per head")
        log_decay, name = g_gamma, "g_gamma"
    if state_v_first and initial_state is not None:
        initial_state = _state_from_v_first(initial_state, heads, k.shape[-1], v.shape[-1])
    o, state = _attention(q, k, v, log_decay, name, scale, initial_state, output_final_state, cu_seqlens, cu_cpu)
    return o, state.transpose(-1, -2).contiguous() if state is not None and state_v_first else state


def _attention(q, k, v, log_decay, decay_name, scale, initial_state, output_final_state, cu_seqlens, cu_cpu=None):
    """leetdecoding.attention on views of fla's layout; (o (B, T, H, V), final_state or None)."""
    if scale is None:
        if k.shape[-1] < 1:
            raise ValueError(f"q and k must have a head dim K >= 1 (scale=None means K^-0.5); got k {tuple(k.shape)}.")
        scale = k.shape[-1] ** -0.5
    try:
        result = attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), log_decay=log_decay, scale=scale,
            initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
            cu_seqlens_cpu=cu_cpu,
        )  # fmt: skip
    except (ValueError, TypeError) as error:
        raise _renamed(error, decay_name) from None
    o, state = result if output_final_state else (result, None)
    # fla returns o contiguous in its layout; code written for it may .view() it
    return o.transpose(1, 2).contiguous(), state


def _renamed(error: Exception, decay_name: str) -> Exception:
    """leetdecoding's message names the decay `log_decay`; the caller passed it as fla's `g` or `g_gamma`."""
    if type(error) not in (ValueError, TypeError) or "log_decay" not in str(error):
        return error
    return type(error)(str(error).replace("log_decay", decay_name))


def _check_qkv(q, k, v, cu_seqlens) -> tuple[int, int, int, int]:
    """fla's layout: q, k (B, T, H, K), v (B, T, H, V), B = 1 with cu_seqlens. Returns (B, T, H, K). The dtypes,
    devices and offsets are checked by leetdecoding.attention, whose messages name the same arguments."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, T, H, D); got {type(x).__name__}.")
        if x.ndim != 4:
            raise ValueError(f"{name} must have 4 dimensions (B, T, H, D), fla's layout; got shape {tuple(x.shape)}.")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k must be (B, T, H, K) and v (B, T, H, V) with the same B, T, H; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}."
        )
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(
            f"with cu_seqlens, q, k, v must be (1, T, H, D), the sequences packed along T; got batch size "
            f"{q.shape[0]}. Hint: flatten them, e.g. q.reshape(1, -1, H, K) for equal lengths."
        )
    return tuple(q.shape)


def _check_shape(name: str, x, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {what}; got {type(x).__name__}.")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} {what}; got {tuple(x.shape)}.")


def _state_from_v_first(state, heads: int, dk: int, dv: int) -> torch.Tensor:
    """An initial_state in fla's state_v_first layout (N, H, V, K), as the (N, H, K, V) view leetdecoding takes
    (which refuses anything but a tensor, naming initial_state)."""
    if not isinstance(state, torch.Tensor):
        return state
    if state.ndim != 4 or tuple(state.shape[1:]) != (heads, dv, dk):
        expected = f"(N, H, V, K) = (N, {heads}, {dv}, {dk})"
        raise ValueError(f"initial_state must be {expected} with state_v_first; got {tuple(state.shape)}.")
    return state.transpose(-1, -2)


def _check_chunk_options(chunk_size, head_first) -> None:
    """The options of fla's chunk_* functions that leave the result unchanged, checked as fla checks them."""
    if head_first:
        raise ValueError(
            "head_first=True ((B, H, T, D) inputs, which fla no longer accepts either) is not supported; got "
            "head_first=True. Hint: pass q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2) and "
            "g.transpose(1, 2) (views, no copies), or call leetdecoding.attention, whose layout is (B, H, T, D)."
        )
    positive = isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0
    if chunk_size is not None and not (positive and chunk_size & (chunk_size - 1) == 0):
        raise ValueError(f"chunk_size must be a power of 2 (the dispatcher chooses the chunk); got {chunk_size!r}.")


def _decay_dtype(q: torch.Tensor) -> torch.dtype:
    """The decays in leetdecoding's compute dtype: fp64 for fp64 inputs (fla forms them in fp32), else fp32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32
