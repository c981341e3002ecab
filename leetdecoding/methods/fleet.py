"""fleet: FleetAttention. The output is a sum of Dk rank-one terms,

    o_t = sum_d q_t[d] * P_d(t),   P_d(t) = lambda P_d(t-1) + k_t[d] v_t,   P_d(-1) = S_init[d, :]

each P_d a discounted prefix sum over time. The prefix sums are computed blockwise and exactly (a small
decay matrix inside a block, the same scan one level up across blocks), so signed inputs, lambda = 1 and
tiny lambda are all exact: nothing takes log(k * v) or divides by lambda^t. Row d of the final state is P_d(N-1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..inputs import AttentionInputs
from .base import Method, causal_decay_matrix, decay_powers, elem_bytes, finish

BLOCK = 16  # tokens per block of the prefix sum; each level up covers BLOCK times more


def _expand(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """(1, H, a, b) -> (1, H, 1.., a, b) with ndim dims."""
    return t.view(1, t.shape[1], *(1,) * (ndim - 4), *t.shape[2:])


def discounted_cumsum(x: torch.Tensor, log_decay: torch.Tensor, initial: torch.Tensor | None = None) -> torch.Tensor:
    """y_t = lambda_h y_{t-1} + x_t along dim -2 of x (B, H, ..., N, F); y_{-1} = initial (B, H, ..., F) or 0."""
    n = x.shape[-2]
    if n <= BLOCK:
        y = _expand(causal_decay_matrix(log_decay, n), x.ndim) @ x
        if initial is not None:
            steps = torch.arange(1, n + 1, device=x.device, dtype=x.dtype)
            y = y + decay_powers(log_decay, steps, x.ndim) * initial.unsqueeze(-2)
        return y
    nb = math.ceil(n / BLOCK)
    xb = F.pad(x, (0, 0, 0, nb * BLOCK - n)).unflatten(-2, (nb, BLOCK))
    y = _expand(causal_decay_matrix(log_decay, BLOCK), xb.ndim) @ xb
    # value at the end of each block, then the same scan one level up with lambda^BLOCK
    ends = discounted_cumsum(y[..., -1, :], log_decay * BLOCK, initial)
    before = ends[..., :-1, :]
    if initial is not None:
        before = torch.cat((initial.unsqueeze(-2), before), dim=-2)
    else:
        before = F.pad(before, (0, 0, 1, 0))
    steps = torch.arange(1, BLOCK + 1, device=x.device, dtype=x.dtype)
    y = y + decay_powers(log_decay, steps, xb.ndim) * before.unsqueeze(-2)
    return y.flatten(-3, -2)[..., :n, :]


def group_size(x: AttentionInputs, budget_bytes: int) -> int:
    """How many of the Dk rank-one terms to compute at once within the memory budget."""
    per_term = 4 * elem_bytes(x) * x.batch * x.heads * (x.seq_len + BLOCK) * x.dv
    return max(1, min(x.dk, budget_bytes // max(per_term, 1)))


class Fleet(Method):
    name = "fleet"
    algorithm = "FleetAttention: Dk rank-one terms, each a discounted prefix sum"
    time_complexity = "O(N Dk Dv)"
    memory_complexity = "O(N Dv)"
    options = {"budget_bytes": 64 << 20}

    def flops(self, x: AttentionInputs, **options) -> float:
        return 2.0 * x.batch * x.heads * x.seq_len * x.dk * x.dv * (BLOCK + 3)

    def extra_memory_bytes(self, x: AttentionInputs, budget_bytes: int = 64 << 20, **options) -> int:
        g = group_size(x, budget_bytes)
        per_term = 4 * elem_bytes(x) * x.batch * x.heads * (x.seq_len + BLOCK) * x.dv
        return g * per_term + elem_bytes(x) * x.batch * x.heads * x.seq_len * (x.dv + x.dk)

    def forward(self, x: AttentionInputs, budget_bytes: int = 64 << 20, **options):
        cd = x.compute_dtype
        B, H, N = x.batch, x.heads, x.seq_len
        v = x.v.to(cd).unsqueeze(2)  # (B, H, 1, N, Dv)
        o = torch.zeros(B, H, N, x.dv, dtype=cd, device=x.device)
        rows = []
        g = group_size(x, budget_bytes)
        for d0 in range(0, x.dk, g):
            d1 = min(x.dk, d0 + g)
            k_d = x.k[..., d0:d1].to(cd).transpose(-1, -2).unsqueeze(-1)  # (B, H, g, N, 1)
            init = x.initial_state[:, :, d0:d1] if x.initial_state is not None else None
            prefix = discounted_cumsum(k_d * v, x.log_decay, init)  # (B, H, g, N, Dv)
            q_d = x.q[..., d0:d1].to(cd).transpose(-1, -2)  # (B, H, g, N)
            o = o + torch.einsum("bhgn,bhgnf->bhnf", q_d, prefix)
            if x.output_final_state:
                rows.append(prefix[:, :, :, -1])
        state = torch.cat(rows, dim=2) if x.output_final_state else None
        return finish(x, o), state
