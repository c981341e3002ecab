"""fleet: FleetAttention. The output is a sum of Dk rank-one terms,

    o_t = sum_d q_t[d] * P_d(t),   P_d(t) = lambda P_d(t-1) + k_t[d] v_t,   P_d(-1) = S_init[d, :]

each P_d a discounted prefix sum over time. The prefix sums are computed blockwise and exactly (a small
decay matrix inside a block, the same scan one level up across blocks), so signed inputs, lambda = 1 and
tiny lambda are all exact: nothing takes log(k * v) or divides by lambda^t. Row d of the final state is P_d(N-1).
"""

from __future__ import annotations

import torch

from ..inputs import AttentionInputs
from .base import Method, elem_bytes, finish, with_margin, zero_states
from .decay_math import SCAN_BLOCK, discounted_cumsum


def group_size(x: AttentionInputs, budget_bytes: int) -> int:
    """How many of the Dk rank-one terms to compute at once within the memory budget."""
    per_term = 4 * elem_bytes(x) * x.batch * x.heads * (x.seq_len + SCAN_BLOCK) * x.dv
    return max(1, min(x.dk, budget_bytes // max(per_term, 1)))


class Fleet(Method):
    name = "fleet"
    algorithm = "FleetAttention: Dk rank-one terms, each a discounted prefix sum"
    time_complexity = "O(N Dk Dv)"
    memory_complexity = "O(N Dv)"
    # autograd through the rank-one scans would keep every P_d: O(N Dk Dv) memory, so no gradients
    supports_grad = False
    options = ("budget_bytes",)

    def extra_memory_bytes(self, x: AttentionInputs, *, budget_bytes: int) -> int:
        # per term of a group, (N + SCAN_BLOCK) Dv values each: k_d v, its padded blocks, the blocks' scan, the
        # carried ends times their decay, and the sum (5); beside them the output and the next output (N Dv each)
        # and the group's k and q (N each); measured at 7.1 of these units with one term per group
        e, bh, g = elem_bytes(x), x.batch * x.heads, group_size(x, budget_bytes)
        terms = 5 * g * e * bh * (x.seq_len + SCAN_BLOCK) * x.dv
        upcast_v = x.dv if x.dtype != x.compute_dtype else 0  # the compute-dtype copy of v
        per_token = e * bh * x.seq_len * (2 * x.dv + 2 * g + upcast_v)
        return with_margin(terms + per_token + 2 * e * bh * x.dk * x.dv)

    def forward(self, x: AttentionInputs, *, budget_bytes: int):
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
            if x.output_final_state:  # P_d(N - 1); with no tokens P_d(-1), the initial rows (zeros without)
                # (a clone: a view would keep every group's prefix alive)
                rows.append(prefix[:, :, :, -1].clone() if N else _initial_rows(x, d0, d1))
        state = torch.cat(rows, dim=2) if x.output_final_state else None
        return finish(x, o), state


def _initial_rows(x: AttentionInputs, d0: int, d1: int) -> torch.Tensor:
    if x.initial_state is not None:
        return x.initial_state[:, :, d0:d1].clone()
    return zero_states(x, x.batch, d1 - d0)
