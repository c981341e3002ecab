"""The fp64 reference every method is measured against (fla keeps its `naive.py` beside the kernels the same way).

    S_t = lambda S_{t-1} + k_t^T v_t,  S_{-1} = initial state;  o_t = scale * q_t S_t

`reference` runs the recurrence token by token, plus the same sums on absolute values (|q|, |k|, |v|, |S_init|):
the magnitude of the terms each element sums, the scale against which rounding error is measured
(`relative_error`). `reference_closed_form` is the same operator in closed form, differentiable in every input,
for gradient references. `TOLERANCE` is the one table of allowed errors, read by the tests, `leetdecoding check`,
`leetdecoding bench` and benchmarks/gpu_bench.py.

Nothing on the runtime path (api, dispatch) imports this module, and it imports nothing of the package.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# Error allowed per element, as a fraction of the magnitude of the terms it sums (o_abs), per input dtype.
TOLERANCE = {
    torch.float64: 1e-13,
    torch.float32: 2e-6,
    torch.float16: 1e-3,  # about 2 ulp of the fp16 output rounding
    torch.bfloat16: 4e-3,  # about 2 ulp of the bf16 output rounding
}


def rounded_operand_tolerance(dtype: torch.dtype) -> float:
    """The error allowed where an fp32 operand (decayed scores, a state) is rounded on purpose to the input dtype
    (TF32, 10 mantissa bits, for fp32 inputs) before a product: triton_chunked's "fast" precision, and fla and
    transformers' loop on a GPU. That is about one more rounding of the operands than the contract allows: at most
    one bf16 rounding (TOLERANCE[bfloat16], the coarsest of TF32, fp16 and bf16) on top of 8x the dtype's
    tolerance."""
    return 8 * TOLERANCE[dtype] + TOLERANCE[torch.bfloat16]


@dataclass
class Reference:
    o: torch.Tensor  # (B, H, N, Dv) fp64
    o_abs: torch.Tensor
    state: torch.Tensor  # (B, H, Dk, Dv) fp64
    state_abs: torch.Tensor


@contextmanager
def _one_thread() -> Iterator[None]:
    """The loop is thousands of small ops: one thread avoids a thread barrier per op (slow on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float = 1.0,
) -> Reference:
    """q, k (B, H, N, Dk), v (B, H, N, Dv), decay lambda (H,) or a float, or (B, H, N) per token (lambda_t
    multiplies the state before token t); computed in fp64 on the CPU."""
    q, k, v = (t.detach().to("cpu", torch.float64) for t in (q, k, v))
    B, H, N, Dk = q.shape
    decay = torch.as_tensor(decay).detach().to("cpu", torch.float64)
    per_token = decay.ndim == 3
    lam = decay.unsqueeze(-1).unsqueeze(-1) if per_token else decay.expand(H).reshape(1, H, 1, 1)
    if initial_state is None:
        s = torch.zeros(B, H, Dk, v.shape[-1], dtype=torch.float64, device="cpu")
    else:
        s = initial_state.detach().to("cpu", torch.float64)
    s_abs = s.abs()
    o = torch.empty(B, H, N, v.shape[-1], dtype=torch.float64, device="cpu")
    o_abs = torch.empty_like(o)
    with _one_thread():
        for t in range(N):
            kv = k[:, :, t, :, None] * v[:, :, t, None, :]
            lam_t = lam[:, :, t] if per_token else lam
            s = lam_t * s + kv
            s_abs = lam_t * s_abs + kv.abs()
            o[:, :, t] = scale * (q[:, :, t, None, :] @ s).squeeze(-2)
            o_abs[:, :, t] = abs(scale) * (q[:, :, t, None, :].abs() @ s_abs).squeeze(-2)
    return Reference(o, o_abs, s, s_abs)


def relative_error(got: torch.Tensor, ref: torch.Tensor, ref_abs: torch.Tensor) -> float:
    """max over elements of |got - ref| / ref_abs; inf for a wrong shape or a non-finite value."""
    got = got.detach().to(ref.device, torch.float64)
    if got.shape != ref.shape:
        return float("inf")
    if got.numel() == 0:
        return 0.0
    err = (got - ref).abs() / (ref_abs + 1e-300)
    worst = err.max().item()
    return worst if worst == worst else float("inf")  # NaN -> inf


def reference_closed_form(q, k, v, log_decay, initial_state=None, scale=1.0):
    """The operator in closed form, fp64, differentiable in every input (for gradient references):
    o_t = scale (sum_{s<=t} lambda^(t-s) (q_t . k_s) v_s + lambda^(t+1) q_t S0); also returns the final state.
    A per-token log_decay (B, H, N) takes the factors exp(G_t - G_s) of its cumulative sums G (moderate values:
    the sums are global here)."""
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    if log_decay.ndim == 3:
        return _closed_form_per_token(q, k, v, log_decay.to(torch.float64), initial_state, scale)
    g = log_decay.to(torch.float64).view(1, -1, 1, 1)
    n = q.shape[2]
    t = torch.arange(n, dtype=torch.float64)
    diff = t[:, None] - t[None, :]
    mask = torch.where(diff >= 0, torch.exp(g * diff.clamp(min=0)), torch.zeros((), dtype=torch.float64))
    o = ((q @ k.transpose(-1, -2)) * mask) @ v
    state = (k * torch.exp(g * (n - 1 - t).view(1, 1, -1, 1))).transpose(-1, -2) @ v
    if initial_state is not None:
        s0 = initial_state.to(torch.float64)
        o = o + (q * torch.exp(g * (t + 1).view(1, 1, -1, 1))) @ s0
        state = state + torch.exp(g * n) * s0
    return scale * o, state


def _closed_form_per_token(q, k, v, g, initial_state, scale):
    G = torch.cumsum(g, dim=-1)  # (B, H, N)
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask = torch.exp((G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~causal, float("-inf")))
    o = ((q @ k.transpose(-1, -2)) * mask) @ v
    last = G[..., -1:] if n else G.new_zeros(*G.shape[:-1], 1)
    state = (k * torch.exp(last - G).unsqueeze(-1)).transpose(-1, -2) @ v
    if initial_state is not None:
        s0 = initial_state.to(torch.float64)
        o = o + (q * torch.exp(G).unsqueeze(-1)) @ s0
        state = state + torch.exp(last).unsqueeze(-1) * s0
    return scale * o, state
