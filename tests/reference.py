"""The fp64 references the tests compare against.

The recurrence itself, token by token (`reference`, shared with `leetdecoding check`), which also returns the
same sums on absolute values: the magnitude of the terms each element sums, against which rounding error is
measured. And the closed form, differentiable in every input, for gradients (`reference_closed_form`).
"""

from __future__ import annotations

import torch

from leetdecoding.bench.reference import TOLERANCE, reference

__all__ = ["TOLERANCE", "reference", "assert_close", "reference_closed_form"]


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
