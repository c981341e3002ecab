"""The fp64 reference: the recurrence itself, token by token, written as plainly as possible.

Besides the output it returns the same computation on absolute values, |q| |S| with |S| built from |k| |v|
and |S_init|: the magnitude of the terms each output element sums, against which rounding error is measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Ref:
    o: torch.Tensor
    o_abs: torch.Tensor
    state: torch.Tensor
    state_abs: torch.Tensor


def reference(q, k, v, decay, initial_state=None) -> Ref:
    """q, k (B, H, N, Dk), v (B, H, N, Dv), decay (H,) or a float, lambda in (0, 1]."""
    q, k, v = (t.detach().to(torch.float64) for t in (q, k, v))
    B, H, N, Dk = q.shape
    Dv = v.shape[-1]
    lam = torch.as_tensor(decay, dtype=torch.float64).expand(H).reshape(1, H, 1, 1)
    if initial_state is None:
        s = torch.zeros(B, H, Dk, Dv, dtype=torch.float64)
        s_abs = s.clone()
    else:
        s = initial_state.detach().to(torch.float64)
        s_abs = s.abs()
    o = torch.empty(B, H, N, Dv, dtype=torch.float64)
    o_abs = torch.empty_like(o)
    for t in range(N):
        s = lam * s + k[:, :, t, :, None] * v[:, :, t, None, :]
        s_abs = lam * s_abs + (k[:, :, t, :, None] * v[:, :, t, None, :]).abs()
        o[:, :, t] = torch.einsum("bhd,bhde->bhe", q[:, :, t], s)
        o_abs[:, :, t] = torch.einsum("bhd,bhde->bhe", q[:, :, t].abs(), s_abs)
    return Ref(o, o_abs, s, s_abs)


# Error allowed per element, as a fraction of the magnitude of the terms it sums (o_abs), per input dtype.
TOLERANCE = {
    torch.float64: 1e-13,
    torch.float32: 2e-6,
    torch.float16: 1e-3,  # about 2 ulp of the fp16 output rounding
    torch.bfloat16: 4e-3,  # about 2 ulp of the bf16 output rounding
}


def assert_close(name, got, ref, ref_abs, dtype, scale=1.0):
    """|got - scale * ref| <= tol * |scale| * ref_abs elementwise (plus a tiny floor), and no NaN."""
    got = got.detach().to(torch.float64)
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values in the output"
    tol = TOLERANCE[dtype]
    bound = tol * abs(scale) * ref_abs + 1e-30
    err = (got - scale * ref).abs()
    ratio = (err / bound).max().item() if err.numel() else 0.0
    assert ratio <= 1.0, f"{name}: error {ratio:.3g} x the {dtype} tolerance (max abs err {err.max().item():.3g})"


def reference_closed_form(q, k, v, log_decay, initial_state=None, scale=1.0):
    """The operator in closed form, fp64, differentiable in every input (for gradient references):
    o_t = scale (sum_{s<=t} lambda^(t-s) (q_t . k_s) v_s + lambda^(t+1) q_t S0); also returns the final state."""
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
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
