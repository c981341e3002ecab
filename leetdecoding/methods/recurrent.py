"""recurrent: the causal dot product, the recurrence S_t = lambda S_{t-1} + k_t^T v_t, o_t = q_t S_t."""

from __future__ import annotations

import torch

from ..inputs import AttentionInputs
from .base import Method, elem_bytes, finish, head_log_decay, new_output


class Recurrent(Method):
    name = "recurrent"
    algorithm = "causal dot product: one state update per token"
    time_complexity = "O(N Dk Dv)"
    memory_complexity = "O(Dk Dv)"

    def flops(self, x: AttentionInputs, **options) -> float:
        return 4.0 * x.batch * x.heads * x.seq_len * x.dk * x.dv

    def extra_memory_bytes(self, x: AttentionInputs, **options) -> int:
        return elem_bytes(x) * x.batch * x.heads * (3 * x.dk * x.dv + x.dk + x.dv)

    def forward(self, x: AttentionInputs, **options):
        cd = x.compute_dtype
        lam = torch.exp(head_log_decay(x))  # (1, H, 1, 1)
        if x.initial_state is not None:
            state = x.initial_state
        else:
            state = torch.zeros(x.batch, x.heads, x.dk, x.dv, dtype=cd, device=x.device)
        o = new_output(x)
        for t in range(x.seq_len):
            q_t = x.q[:, :, t].to(cd)
            k_t = x.k[:, :, t].to(cd)
            v_t = x.v[:, :, t].to(cd)
            state = lam * state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
            o[:, :, t] = finish(x, (q_t.unsqueeze(-2) @ state).squeeze(-2))
        return o, (state if x.output_final_state else None)
