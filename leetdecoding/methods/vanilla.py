"""vanilla: the materialised masked product ((Q K^T) * D) V. Quadratic, and the readable reference."""

from __future__ import annotations

from ..inputs import AttentionInputs
from . import gated, gated_chunked
from .base import Method, elem_bytes, finish, upcast_bytes, with_margin
from .chunked import ChunkedFunction
from .decay_math import causal_decay_matrix, final_state, initial_state_output


class Vanilla(Method):
    name = "vanilla"
    algorithm = "materialised masked (Q K^T * D) V"
    plain_autograd = True
    time_complexity = "O(N^2 (Dk+Dv))"
    memory_complexity = "O(N^2)"
    time_exponent = 2.0
    per_token_decay = True

    def extra_memory_bytes(self, x: AttentionInputs) -> int:
        # Counted from forward (bench/memory.py measures it: benchmarks/memory_estimates.py). While the decay
        # mask is built, Q K^T (B H N^2) is alive beside the index differences and their clamped copy (fp64,
        # N^2 each) and decay_factor's tables per head: the exponent (compute dtype), exp and its zeros and where
        # in fp64, a bool mask (25 bytes); then the masked product (B H N^2) beside the mask (H N^2).
        e, n2, bh = elem_bytes(x), x.seq_len**2, x.batch * x.heads
        mask_build = 17 * n2 + (e + 25) * x.heads * n2
        product = e * (bh + x.heads) * n2
        matrices = e * bh * n2 + max(mask_build, product)
        # with grad, autograd keeps the mask and the product, both counted above; Q K^T and decay_factor's exp
        # table too when the decay needs a gradient
        if x.requires_grad and x.log_decay.requires_grad:
            matrices += e * bh * n2 + 8 * x.heads * n2
        # the output in the compute dtype, the initial state's term and their sum, and upcast q, k, v
        return with_margin(matrices + 3 * e * bh * x.seq_len * x.dv + upcast_bytes(x))

    def forward(self, x: AttentionInputs):
        if x.per_token:  # the whole sequence as one block of leetdecoding.methods.gated
            n = max(x.seq_len, 1)
            if x.requires_grad:  # gated_chunked's backward over that one block: its d log lambda sums pair terms,
                # exact where autograd through the block loses digits to small decays (1e-3 relative at 1e-12)
                args = (x.q, x.k, x.v, x.log_decay, x.initial_state, x.scale, n, 0, gated_chunked.KERNELS)
                o, state = ChunkedFunction.apply(*args)
            else:
                o, state = gated.forward_blocks(x, n)
            return o, (state if x.output_final_state else None)
        cd = x.compute_dtype
        q, k, v = x.q.to(cd), x.k.to(cd), x.v.to(cd)
        scores = (q @ k.transpose(-1, -2)) * causal_decay_matrix(x.log_decay, x.seq_len)
        o = scores @ v
        del scores
        if x.initial_state is not None:
            o = o + initial_state_output(x, q)
        state = final_state(x, k, v) if x.output_final_state else None
        return finish(x, o), state
