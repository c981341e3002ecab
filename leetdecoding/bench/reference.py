"""The fp64 reference: the recurrence token by token, plus the same sums on absolute values.

    S_t = lambda S_{t-1} + k_t^T v_t,  S_{-1} = initial state;  o_t = scale * q_t S_t

The absolute-value run (|q|, |k|, |v|, |S_init|) gives the magnitude of the terms each element sums:
the scale against which rounding error is measured.
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
    """q, k (B, H, N, Dk), v (B, H, N, Dv), decay lambda (H,) or a float; computed in fp64 on the CPU."""
    q, k, v = (t.detach().to("cpu", torch.float64) for t in (q, k, v))
    B, H, N, Dk = q.shape
    lam = torch.as_tensor(decay).detach().to("cpu", torch.float64).expand(H).reshape(1, H, 1, 1)
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
            s = lam * s + kv
            s_abs = lam * s_abs + kv.abs()
            o[:, :, t] = scale * (q[:, :, t, None, :] @ s).squeeze(-2)
            o_abs[:, :, t] = abs(scale) * (q[:, :, t, None, :].abs() @ s_abs).squeeze(-2)
    return Reference(o, o_abs, s, s_abs)


def relative_error(got: torch.Tensor, ref: torch.Tensor, ref_abs: torch.Tensor) -> float:
    """max over elements of |got - ref| / ref_abs; inf for a wrong shape or a non-finite value."""
    got = got.detach().to("cpu", torch.float64)
    if got.shape != ref.shape:
        return float("inf")
    if got.numel() == 0:
        return 0.0
    err = (got - ref).abs() / (ref_abs + 1e-300)
    worst = err.max().item()
    return worst if worst == worst else float("inf")  # NaN -> inf
