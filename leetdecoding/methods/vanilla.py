"""vanilla: the materialised masked product ((Q K^T) * D) V. Quadratic, and the readable reference."""

from __future__ import annotations

from ..inputs import AttentionInputs
from .base import (
    Method,
    causal_decay_matrix,
    elem_bytes,
    final_state,
    finish,
    initial_state_output,
    upcast_bytes,
)


class Vanilla(Method):
    name = "vanilla"
    algorithm = "materialised masked (Q K^T * D) V"
    time_complexity = "O(N^2 (Dk+Dv))"
    memory_complexity = "O(N^2)"
    time_exponent = 2.0

    def flops(self, x: AttentionInputs, **options) -> float:
        return 2.0 * x.batch * x.heads * x.seq_len**2 * (x.dk + x.dv)

    def extra_memory_bytes(self, x: AttentionInputs, **options) -> int:
        # scores and the decay mask (N, N) per batch and head, plus upcast copies and the fp32 output
        n2 = x.batch * x.heads * x.seq_len**2 * 2 + x.heads * x.seq_len**2
        return elem_bytes(x) * (n2 + x.batch * x.heads * x.seq_len * x.dv) + upcast_bytes(x)

    def forward(self, x: AttentionInputs, **options):
        cd = x.compute_dtype
        q, k, v = x.q.to(cd), x.k.to(cd), x.v.to(cd)
        scores = (q @ k.transpose(-1, -2)) * causal_decay_matrix(x.log_decay, x.seq_len)
        o = scores @ v
        del scores
        if x.initial_state is not None:
            o = o + initial_state_output(x, q)
        state = final_state(x, k, v) if x.output_final_state else None
        return finish(x, o), state
