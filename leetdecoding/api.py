"""Public functions: validate the inputs once, normalise the decay, let the dispatcher choose, run."""

from __future__ import annotations

import torch

from . import dispatch
from .inputs import AttentionInputs, validate
from .methods import REGISTRY


def _empty_sequence(x: AttentionInputs):
    o = torch.empty(x.batch, x.heads, 0, x.dv, dtype=x.dtype, device=x.device)
    if x.initial_state is not None:
        state = x.initial_state.clone()  # lambda^0 S_init: never alias the caller's tensor
    else:
        state = torch.zeros(x.batch, x.heads, x.dk, x.dv, dtype=x.compute_dtype, device=x.device)
    return o, state


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
):
    """Exponentially decaying causal linear attention.

    o_t = scale * q_t S_t with S_t = lambda_h S_{t-1} + k_t^T v_t and S_{-1} = initial_state (zeros if None).

    q, k: (B, H, N, Dk); v: (B, H, N, Dv); strided views are fine. `decay` is lambda in (0, 1] (a float or an
    (H,) tensor), or pass `log_decay` = log lambda <= 0 (see `leetdecoding.decay` for named conventions);
    neither means lambda = 1. `method` is "auto" or a name from `list_methods()`.

    Returns o (B, H, N, Dv) in the input dtype, or (o, final_state) with the state (B, H, Dk, Dv) in fp32
    (fp64 for fp64 inputs) when `output_final_state`.
    """
    x = validate(q, k, v, decay, log_decay, scale, initial_state, output_final_state)
    choice = dispatch.choose(x, method)
    if x.seq_len == 0:
        o, state = _empty_sequence(x)
    else:
        o, state = choice.method.forward(x, **choice.options)
    return (o, state) if output_final_state else o


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
) -> dispatch.Explanation:
    """Which method `attention` would use for these inputs, why, and why each other method is not used.

    Prints as a readable report; the fields (`method`, `options`, `reason`, `refusals`) are there for code.
    """
    x = validate(q, k, v, decay, log_decay, scale, initial_state, output_final_state)
    return dispatch.explain(x, method)


def list_methods() -> list[dict]:
    """Every method with its backend, devices, dtypes, complexity and grad / state / varlen support."""
    return [m.info() for m in REGISTRY.values()]
