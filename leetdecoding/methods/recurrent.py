"""recurrent: the causal dot product, the recurrence S_t = lambda S_{t-1} + k_t^T v_t, o_t = q_t S_t.

`step` is also the decode step: one token, the state updated in place (or into a given buffer) when no gradient
is needed, so that a server can reuse one state buffer per sequence without allocating per token.
"""

from __future__ import annotations

import torch

from ..inputs import AttentionInputs
from .base import Method, elem_bytes, finish, head_log_decay, new_output


def step(state, q_t, k_t, v_t, lam, out=None):
    """One token: returns (o_t, new_state), o_t = q_t (lam S + k_t^T v_t) in the state dtype, unscaled.

    q_t, k_t (B, H, Dk), v_t (B, H, Dv) in the state dtype; lam (1, H, 1, 1). With `out` (which may be `state`
    itself) the new state is written there; otherwise a new tensor is returned.
    """
    if out is None:
        new = torch.addcmul(state * lam, k_t.unsqueeze(-1), v_t.unsqueeze(-2))
    else:
        new = torch.mul(state, lam, out=out).addcmul_(k_t.unsqueeze(-1), v_t.unsqueeze(-2))
    return (q_t.unsqueeze(-2) @ new).squeeze(-2), new


class Recurrent(Method):
    name = "recurrent"
    algorithm = "causal dot product: one state update per token"
    time_complexity = "O(N Dk Dv)"
    memory_complexity = "O(Dk Dv)"

    def flops(self, x: AttentionInputs, **options) -> float:
        return 4.0 * x.batch * x.heads * x.seq_len * x.dk * x.dv

    def extra_memory_bytes(self, x: AttentionInputs, **options) -> int:
        return elem_bytes(x) * x.batch * x.heads * (2 * x.dk * x.dv + x.dk + x.dv)

    def forward(self, x: AttentionInputs, **options):
        cd = x.compute_dtype
        lam = torch.exp(head_log_decay(x))
        if x.initial_state is not None:
            state = x.initial_state
        else:
            state = torch.zeros(x.batch, x.heads, x.dk, x.dv, dtype=cd, device=x.device)
        # without autograd, one private buffer updated in place; with it, a new state per token
        buffer = None if x.requires_grad else torch.empty_like(state)
        o = new_output(x)
        for t in range(x.seq_len):
            o_t, state = step(state, x.q[:, :, t].to(cd), x.k[:, :, t].to(cd), x.v[:, :, t].to(cd), lam, buffer)
            o[:, :, t] = finish(x, o_t)
        return o, (state if x.output_final_state else None)
