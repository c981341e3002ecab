"""chunked: block-based / Lightning Attention-2.

The sequence is cut into chunks of C tokens. Inside a chunk the output is exact quadratic attention with the
decay mask; across chunks a carried state S (Dk x Dv) brings in everything before:

    o_t = (q_t k_s^T * lambda^(t-s))_{s in chunk, s<=t} v_s  +  lambda^(t+1) q_t S_chunk_start
    S_next = lambda^C S_chunk_start + sum_s lambda^(C-1-s) k_s^T v_s

Chunks are processed a segment at a time (many chunks per batched matmul), so that Python overhead stays
small and working memory is bounded by the segment, not by N.
"""

from __future__ import annotations

import torch

from ..inputs import AttentionInputs
from .base import (
    Method,
    causal_decay_matrix,
    decay_powers,
    elem_bytes,
    finish,
    head_log_decay,
    new_output,
    state_contribution,
)


def segment_length(x: AttentionInputs, chunk_size: int, segment_bytes: int) -> int:
    """Tokens per segment: a multiple of the chunk size whose working set fits in `segment_bytes`."""
    per_head = 2 * chunk_size + 2 * x.dk + 2 * x.dv + 2 * x.dk * x.dv / chunk_size
    per_token = elem_bytes(x) * x.batch * x.heads * per_head
    chunks = max(1, int(segment_bytes // max(per_token * chunk_size, 1)))
    return chunk_size * chunks


class Chunked(Method):
    name = "chunked"
    algorithm = "block-based / Lightning Attention-2: exact intra-chunk block + carried state"
    time_complexity = "O(N C (Dk+Dv) + N Dk Dv)"
    memory_complexity = "O(Dk Dv + C^2)"
    options = {"chunk_size": 64, "segment_bytes": 64 << 20}

    def flops(self, x: AttentionInputs, chunk_size: int = 64, **options) -> float:
        c = min(chunk_size, max(x.seq_len, 1))
        return 2.0 * x.batch * x.heads * x.seq_len * (c * (x.dk + x.dv) + 2 * x.dk * x.dv)

    def extra_memory_bytes(self, x: AttentionInputs, chunk_size: int = 64, segment_bytes: int = 64 << 20, **o) -> int:
        c = max(1, min(chunk_size, x.seq_len))
        seg = min(segment_length(x, c, segment_bytes), -(-x.seq_len // c) * c)
        # per token of a segment: scores and their masked copy (2C), decayed q and k, intra and inter outputs,
        # compute-dtype copies of q, k, v; per chunk: its state contribution and its start state
        per_token = 2 * c + 2 * x.dk + 2 * x.dv + (2 * x.dk + x.dv if x.dtype != x.compute_dtype else 0)
        per_head = seg * per_token + (2 * (seg // c) + 2) * x.dk * x.dv
        return elem_bytes(x) * x.batch * x.heads * per_head

    def forward(self, x: AttentionInputs, chunk_size: int = 64, segment_bytes: int = 64 << 20, **options):
        cd = x.compute_dtype
        B, H, N = x.batch, x.heads, x.seq_len
        C = max(1, min(chunk_size, N))
        ld = x.log_decay
        mask = causal_decay_matrix(ld, C).unsqueeze(2)  # (1, H, 1, C, C)
        idx = torch.arange(C, device=x.device, dtype=cd)
        q_decay = decay_powers(ld, idx + 1).unsqueeze(2)  # (1, H, 1, C, 1)
        k_decay = decay_powers(ld, C - 1 - idx).unsqueeze(2)
        chunk_decay = torch.exp(head_log_decay(x) * C)  # (1, H, 1, 1)

        if x.initial_state is not None:
            state = x.initial_state
        else:
            state = torch.zeros(B, H, x.dk, x.dv, dtype=cd, device=x.device)
        o = new_output(x)
        seg = segment_length(x, C, segment_bytes)
        for start in range(0, N, seg):
            end = min(N, start + seg)
            n = end - start
            full = n // C  # complete chunks in this segment
            if full:
                q = x.q[:, :, start : start + full * C].to(cd).unflatten(2, (full, C))
                k = x.k[:, :, start : start + full * C].to(cd).unflatten(2, (full, C))
                v = x.v[:, :, start : start + full * C].to(cd).unflatten(2, (full, C))
                out = ((q @ k.transpose(-1, -2)) * mask) @ v
                kv = (k * k_decay).transpose(-1, -2) @ v  # (B, H, full, Dk, Dv)
                # state at the start of each chunk: a loop over chunks measured faster on CPU than a batched
                # discounted scan over the (full, Dk, Dv) contributions
                starts = torch.empty_like(kv)
                for c in range(full):
                    starts[:, :, c] = state
                    state = chunk_decay * state + kv[:, :, c]
                out = out + (q * q_decay) @ starts
                o[:, :, start : start + full * C] = finish(x, out.flatten(2, 3))
            if n > full * C:  # the sequence's last, partial chunk
                r = n - full * C
                q = x.q[:, :, start + full * C : end].to(cd)
                k = x.k[:, :, start + full * C : end].to(cd)
                v = x.v[:, :, start + full * C : end].to(cd)
                out = ((q @ k.transpose(-1, -2)) * mask[:, :, 0, :r, :r]) @ v
                out = out + (q * q_decay[:, :, 0, :r]) @ state
                o[:, :, start + full * C : end] = finish(x, out)
                if x.output_final_state:
                    state = torch.exp(head_log_decay(x) * r) * state + state_contribution(k, v, ld)
        return o, (state if x.output_final_state else None)

