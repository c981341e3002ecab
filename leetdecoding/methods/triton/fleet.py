"""triton_fleet: FleetAttention's rank-one discounted scans, forward.

    o_t = scale * sum_d q_t[d] P_d(t),   P_d(t) = lambda P_d(t-1) + k_t[d] v_t,   P_d(-1) = S_init[d, :]

One program per (Dv block, Dk block, batch * head) walks the sequence in blocks of BT tokens. For every d of
its Dk block at once, the rank-one terms x[d, t, :] = k_t[d] v_t are scanned inside the block with the decay
matrix (a batched tl.dot, exact for every lambda: lambda^(i-j), never lambda^(-j)); the carried rows P_d enter
as lambda^(i+1) P_d, and o_t = sum_d q_t[d] P_d(t) is reduced over the block's d. With several Dk blocks the
partial outputs meet in an fp32 buffer (atomic adds) and are cast once at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...inputs import compute_dtype_for
from .common import INTERPRET, decay_power, dim_block, dtype_flags, forward_buffers, split_log_decay
from .launching import kernel_scale, launcher, scale_fp64, strides, warps
from .prologue import NO_SPEC, block_range, chunk_span, head_decays, program_head
from .tile_math import _sum_combine, round_to_bf16


@triton.jit(do_not_specialize=NO_SPEC)
def fleet_fwd_kernel(
    q, k, v, o, s0, sn, log_decay, decay, scale, N, H, K, V,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod, s0b, s0h, s0k, s0v,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, ATOMIC: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, ROUND_BF16: tl.constexpr,
):  # fmt: skip
    i_bh, i_b, i_h = program_head(H)
    g_hi, g_lo, c_hi, c_lo, b_lam_ij, b_lam_q = head_decays(log_decay, decay, i_h, BT, ACC)
    b_lam_ij3 = tl.broadcast_to(b_lam_ij[None, :, :], (BK, BT, BT))  # the same scan for every d
    o_k, m_k = block_range(tl.program_id(1), BK, K)
    o_v, m_v = block_range(tl.program_id(2), BV, V)
    m_s = m_k[:, None] & m_v[None, :]

    p_qt0 = q + i_b * sqb + i_h * sqh + o_k[:, None] * sqd  # q and k loaded transposed: (BK, BT)
    p_kt0 = k + i_b * skb + i_h * skh + o_k[:, None] * skd
    p_v0 = v + i_b * svb + i_h * svh + o_v[None, :] * svd
    p_o0 = o + i_b * sob + i_h * soh + o_v[None, :] * sod

    b_p = tl.zeros([BK, BV], dtype=ACC)  # the rows P_d of this Dk block
    if USE_INITIAL_STATE:
        b_p = tl.load(s0 + i_b * s0b + i_h * s0h + o_k[:, None] * s0k + o_v[None, :] * s0v, mask=m_s, other=0)
        b_p = b_p.to(ACC)

    for i_c in range(0, (N + BT - 1) // BT):
        r_t, m_t, n_c, b_lam_k, f_hi, f_lo = chunk_span(i_c, N, g_hi, g_lo, c_hi, c_lo, BT, ACC)
        m_kt = m_k[:, None] & m_t[None, :]
        m_o = m_t[:, None] & m_v[None, :]
        b_qt = tl.load(p_qt0 + r_t[None, :] * sqn, mask=m_kt, other=0).to(ACC)
        b_kt = tl.load(p_kt0 + r_t[None, :] * skn, mask=m_kt, other=0).to(ACC)
        b_v = tl.load(p_v0 + r_t[:, None] * svn, mask=m_o, other=0).to(ACC)
        b_x = b_kt[:, :, None] * b_v[None, :, :]  # (BK, BT, BV): the rank-one terms k_t[d] v_t
        b_y = tl.dot(b_lam_ij3, b_x, input_precision=PREC) + b_lam_q[None, :, None] * b_p[:, None, :]  # P_d(t)
        b_o = tl.reduce(b_qt[:, :, None] * b_y, 0, _sum_combine) * scale  # (BT, BV)
        if ATOMIC:
            tl.atomic_add(p_o0 + r_t[:, None] * son, b_o, mask=m_o)
        else:
            if ROUND_BF16:
                b_o = round_to_bf16(b_o)
            tl.store(p_o0 + r_t[:, None] * son, b_o.to(o.dtype.element_ty), mask=m_o)
        b_p = b_p * f_hi + b_p * f_lo + tl.reduce(b_x * b_lam_k[None, :, None], 1, _sum_combine)

    if STORE_FINAL_STATE:  # sn is contiguous (B, H, K, V)
        tl.store(sn + i_bh * K * V + o_k[:, None] * V + o_v[None, :], b_p.to(sn.dtype.element_ty), mask=m_s)


def _tiles(dk: int, dv: int) -> tuple[int, int, int]:
    """(BT, BK, BV): the (BK, BT, BV) tile of rank-one terms stays within Triton's 2^20 elements (the
    interpreter: as large as that allows; the GPU: small enough for registers)."""
    bv = dim_block(dv)
    if INTERPRET:
        return 16, min(dim_block(dk), (1 << 20) // (16 * bv)), bv
    return 16, min(dim_block(dk), 16), min(bv, 32)


def forward(q, k, v, log_decay, initial_state, scale: float, output_final_state: bool):
    """o (B, H, N, Dv) in q's dtype, final state (B, H, Dk, Dv) fp32 (an empty tensor when not asked)."""
    B, H, N, Dk = q.shape
    Dv = v.shape[-1]
    bt, bk, bv = _tiles(Dk, Dv)
    nk = triton.cdiv(Dk, bk)
    o, final = forward_buffers(q, v, B, output_final_state)
    out = o if nk == 1 else torch.zeros((B, H, N, Dv), dtype=compute_dtype_for(q.dtype), device=q.device)
    launcher(fleet_fwd_kernel)[(B * H, nk, triton.cdiv(Dv, bv))](
        q, k, v, out, initial_state if initial_state is not None else o, final,
        split_log_decay(log_decay), decay_power(log_decay, bt),
        kernel_scale(scale, q.dtype), N, H, Dk, Dv,
        *strides(q), *strides(k), *strides(v), *strides(out), *strides(initial_state),
        BT=bt, BK=bk, BV=bv,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state, ATOMIC=nk > 1,
        PREC="ieee" if q.dtype == torch.float64 else "tf32x3", **dtype_flags(q.dtype),
        num_warps=warps(bk * bt * bv // 4), num_stages=2,
    )  # fmt: skip
    scale_fp64(out, scale)
    if out is not o:
        o.copy_(out)
    return o, final
