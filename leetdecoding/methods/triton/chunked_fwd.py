"""triton_chunked, forward: the chunked (Lightning Attention-2) algorithm as one fused single-pass Triton kernel.

One program per (Dv block, batch * head) walks the sequence chunk by chunk (BT tokens) with the state block
S (K x BV, fp32) kept on chip:

    o_i   = scale * ( sum_{j <= i} lambda^(i-j) (q_i . k_j) v_j  +  lambda^(i+1) q_i S )      i, j in the chunk
    S    <- lambda^L S + sum_j lambda^(L-1-j) k_j^T v_j                                         L = chunk length

With per-token decays (PER_TOKEN: log decays (B, H, N), or (1, H, T) packed) the factors come from G, the fp64
cumulative sums of the log decays within the chunk (`prologue.token_decays`): lambda^(i-j) -> exp(G_i - G_j),
lambda^(i+1) -> exp(G_i), lambda^(L-1-j) -> exp(G_last - G_j), lambda^L -> exp(G_last), every exponent <= 0.

With `cu_seqlens` one launch computes packed sequences, each on its own (a program per sequence and head).
The backward is in `chunked_bwd`. Kernel argument names as in fla: pointers lower case (q, k, v, o), K and V the
head dims, BT/BK/BV the block sizes, b_ tiles, p_ pointers, o_ offsets, m_ masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    INTERPRET,
    decay_power,
    dim_block,
    dot_flags,
    forward_buffers,
    packed_rows,
    split_log_decay,
    token_log_decays,
)
from .launching import chunk_variants, kernel_scale, launch, launcher, pipeline_stages, scale_fp64, strides, warps
from .prologue import NO_SPEC, block_range, chunk_decays, head_decays, program_head, sequence
from .tile_math import input_dot, mixed_dot, round_to_bf16


@triton.jit(do_not_specialize=NO_SPEC)
def chunked_fwd_kernel(
    q, k, v, o, s0, sn, log_decay, decay, g, sgb, sgh, sgn, neg, cu_seqlens, scale, N, H, K, V,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod, s0b, s0h, s0k, s0v,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, VARLEN: tl.constexpr, PER_TOKEN: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, NATIVE_QK: tl.constexpr, MODE: tl.constexpr, ROUND_BF16: tl.constexpr,
):  # fmt: skip
    i_bh, i_b, i_h = program_head(H)
    g_hi, g_lo, c_hi, c_lo, b_lam_ij, b_lam_q = head_decays(log_decay, decay, i_h, BT, ACC)
    i_b, bos, T, i_n = sequence(cu_seqlens, i_b, N, VARLEN)  # T tokens from bos; i_n indexes states
    o_k, m_k = block_range(0, BK, K)
    o_v, m_v = block_range(tl.program_id(1), BV, V)

    p_q0 = q + i_b * sqb + i_h * sqh + bos * sqn + o_k[None, :] * sqd  # (1, BK); rows added per chunk
    p_k0 = k + i_b * skb + i_h * skh + bos * skn + o_k[:, None] * skd  # (BK, 1): k loaded transposed
    p_v0 = v + i_b * svb + i_h * svh + bos * svn + o_v[None, :] * svd
    p_o0 = o + i_b * sob + i_h * soh + bos * son + o_v[None, :] * sod
    p_g0 = g + i_b * sgb + i_h * sgh + bos * sgn  # per-token log decays (PER_TOKEN)

    m_s = m_k[:, None] & m_v[None, :]
    b_s = tl.zeros([BK, BV], dtype=ACC)
    if USE_INITIAL_STATE:
        b_s = tl.load(s0 + i_n * s0b + i_h * s0h + o_k[:, None] * s0k + o_v[None, :] * s0v, mask=m_s, other=0)
        b_s = b_s.to(ACC)

    for i_c in range(0, (T + BT - 1) // BT):
        r_t, m_t, n_c, b_w_ij, b_w_q, b_lam_k, f_hi, f_lo = chunk_decays(
            i_c, T, g_hi, g_lo, c_hi, c_lo, b_lam_ij, b_lam_q, p_g0, sgn, neg, BT, ACC, PER_TOKEN
        )
        b_q = tl.load(p_q0 + r_t[:, None] * sqn, mask=m_t[:, None] & m_k[None, :], other=0)
        b_kt = tl.load(p_k0 + r_t[None, :] * skn, mask=m_k[:, None] & m_t[None, :], other=0)  # (BK, BT)
        b_v = tl.load(p_v0 + r_t[:, None] * svn, mask=m_t[:, None] & m_v[None, :], other=0)
        b_qk = input_dot(b_q, b_kt, NATIVE_QK, ACC, PREC) * b_w_ij  # decayed causal scores
        # decays applied to the smaller side of each product: q S scaled by row, k^T v through v's rows
        b_v_end = b_v.to(ACC) * b_lam_k[:, None]  # v_j decayed to the chunk's last token
        b_o = mixed_dot(b_qk, b_v, True, MODE, PREC) + mixed_dot(b_s, b_q, False, MODE, PREC) * b_w_q[:, None]
        b_s_add = mixed_dot(b_v_end, b_kt, False, MODE, PREC)  # sum_j lambda^(L-1-j) k_j^T v_j
        b_o = b_o * scale
        if ROUND_BF16:
            b_o = round_to_bf16(b_o)
        tl.store(p_o0 + r_t[:, None] * son, b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
        b_s = b_s * f_hi + b_s * f_lo + b_s_add

    if STORE_FINAL_STATE:  # sn is contiguous (rows, H, K, V)
        tl.store(sn + i_bh * K * V + o_k[:, None] * V + o_v[None, :], b_s.to(sn.dtype.element_ty), mask=m_s)


def _fwd_tiles(dk: int, dv: int) -> tuple[int, int]:
    bk = dim_block(dk)
    bv = dim_block(dv)
    if not INTERPRET:  # one program per Dv block: keep the state block S (BK x BV) in registers
        bv = min(bv, 64 if bk <= 128 else 32)
    return bk, bv


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    initial_state: torch.Tensor | None,
    scale: float,
    output_final_state: bool,
    chunk_size: int,
    precision: str,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, H, N, Dv) in q's dtype and the final state (B, H, Dk, Dv) fp32 (an empty tensor when not asked).

    With `cu_seqlens` (S + 1 offsets on q's device), q, k, v are (1, H, T, D) packed sequences, each computed
    on its own in one launch; initial and final states are (S, H, Dk, Dv)."""
    B, H, N, Dk = q.shape
    Dv = v.shape[-1]
    rows = packed_rows(q, cu_seqlens, initial_state=initial_state)  # programs per head: batch rows or sequences
    o, final = forward_buffers(q, v, rows, output_final_state)
    flags = dot_flags(q.dtype, precision)
    bk, bv = _fwd_tiles(Dk, Dv)
    per_token = log_decay.ndim == 3
    head = log_decay.new_zeros(H) if per_token else log_decay  # per token: the per-head tables are not read
    g_split = split_log_decay(head)

    def run(variant):
        bt, stages = variant
        launcher(chunked_fwd_kernel)[(rows * H, triton.cdiv(Dv, bv))](
            q, k, v, o, initial_state if initial_state is not None else o, final, g_split,
            decay_power(head, bt), *token_log_decays(log_decay), cu_seqlens if cu_seqlens is not None else head,
            kernel_scale(scale, q.dtype), N, H, Dk, Dv,
            *strides(q), *strides(k), *strides(v), *strides(o), *strides(initial_state),
            BT=bt, BK=bk, BV=bv, USE_INITIAL_STATE=initial_state is not None,
            STORE_FINAL_STATE=output_final_state, VARLEN=cu_seqlens is not None, PER_TOKEN=per_token, **flags,
            num_warps=warps(bk * bv), num_stages=stages,
        )  # fmt: skip

    packed = cu_seqlens is not None
    key = ("fwd", Dk, Dv, q.dtype, chunk_size, precision, initial_state is not None, output_final_state, packed,
           per_token)  # fmt: skip
    # head dims over 128: chunks of 32 at most on the GPU, as in the backward (smaller register tiles, fewer spills)
    bt = chunk_size if INTERPRET or bk <= 128 else min(chunk_size, 32)
    launch(key, chunk_variants(bt, pipeline_stages(q.dtype)), run)
    scale_fp64(o, scale)
    return o, final
