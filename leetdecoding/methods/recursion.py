"""recursion: divide and conquer over halves, O(N log N Dk Dv).

A block's output is its left half's output, and its right half's output plus the cross term: the right half's
queries against the left half's state. Solved bottom-up: leaves of LEAF tokens by the quadratic form, then one
level of cross terms per doubling, every level a batched matmul.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..inputs import AttentionInputs
from .base import Method, elem_bytes, finish, with_margin
from .decay_math import causal_decay_matrix, decay_powers, final_state, initial_state_output, state_contribution

LEAF = 32  # tokens per leaf; the original recursed down to 4, where Python overhead dominates


def padded_length(n: int) -> int:
    return LEAF * 2 ** max(0, math.ceil(math.log2(max(1, math.ceil(n / LEAF)))))


class Recursion(Method):
    name = "recursion"
    algorithm = "divide and conquer over halves (cross term through the left half's state)"
    plain_autograd = True
    time_complexity = "O(N log N Dk Dv)"
    memory_complexity = "O(N Dv + N Dk Dv / 64)"
    time_exponent = 1.1

    def extra_memory_bytes(self, x: AttentionInputs) -> int:
        p = padded_length(x.seq_len)
        per_head = p * (2 * x.dk + 3 * x.dv + 2 * LEAF) + 2 * (p // (2 * LEAF)) * x.dk * x.dv
        if x.requires_grad:  # autograd keeps each level's decayed right-half queries and outputs, and the leaves'
            levels = int(math.log2(p // LEAF))
            per_head += levels * p * (2 * x.dk + x.dv) // 2 + 2 * p * LEAF  # measured: about p * Dk per level
        return with_margin(elem_bytes(x) * x.batch * x.heads * per_head)

    def forward(self, x: AttentionInputs):
        cd = x.compute_dtype
        N = x.seq_len
        P = padded_length(N)
        pad = (0, 0, 0, P - N)
        q, k, v = (F.pad(t.to(cd), pad) for t in (x.q, x.k, x.v))
        ld = x.log_decay

        def blocks(t: torch.Tensor, m: int) -> torch.Tensor:
            return t.unflatten(2, (P // m, m))

        scores = (blocks(q, LEAF) @ blocks(k, LEAF).transpose(-1, -2)) * causal_decay_matrix(ld, LEAF).unsqueeze(2)
        o = scores @ blocks(v, LEAF)
        o = o.flatten(2, 3)
        m = LEAF
        while m < P:
            qp, kp, vp = (t.unflatten(2, (P // (2 * m), 2, m)) for t in (q, k, v))
            left_state = state_contribution(kp[:, :, :, 0], vp[:, :, :, 0], ld)  # (B,H,pairs,Dk,Dv)
            q_right = qp[:, :, :, 1] * decay_powers(ld, torch.arange(1, m + 1, device=q.device, dtype=cd), 5)
            o = o.unflatten(2, (P // (2 * m), 2, m))
            o = torch.stack((o[:, :, :, 0], o[:, :, :, 1] + q_right @ left_state), dim=3).flatten(2, 4)
            m *= 2
        o = o[:, :, :N]
        if x.initial_state is not None:
            o = o + initial_state_output(x, q[:, :, :N])
        state = final_state(x, k[:, :, :N], v[:, :, :N]) if x.output_final_state else None
        return finish(x, o), state
