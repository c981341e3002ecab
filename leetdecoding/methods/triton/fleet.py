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

from .common import (
    INTERPRET,
    SUM,
    acc_dtype,
    decay_power,
    dim_block,
    empty_output,
    launcher,
    round_bf16,
    round_to_bf16,
    split_log_decay,
    strides,
    torch_acc_dtype,
    warps,
)

_NO_SPEC = ["N", "sqb", "sqh", "skb", "skh", "svb", "svh", "sob", "soh"]


@triton.jit(do_not_specialize=_NO_SPEC)
def fleet_fwd_kernel(
    Q, K, V, O, S0, SN, LOG_DECAY, DECAY,
    scale, N, H, DK, DV,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    s0b, s0h, s0k, s0v,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, ATOMIC: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, ROUND_BF16: tl.constexpr,
):  # fmt: skip
    i_bh = tl.program_id(0)  # batch * head on the first grid axis (up to 2^31 - 1 programs)
    i_k = tl.program_id(1)
    i_v = tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    g_hi = tl.load(LOG_DECAY + 2 * i_h).to(ACC)  # log lambda = g_hi + g_lo: lambda^e = exp(g_hi e) exp(g_lo e)
    g_lo = tl.load(LOG_DECAY + 2 * i_h + 1).to(ACC)  # (see `split_log_decay`: exact for e < 256, never -inf * 0)
    c_hi = tl.load(DECAY + 2 * i_h)  # lambda^BT = c_hi + c_lo, accurate: it compounds over blocks
    c_lo = tl.load(DECAY + 2 * i_h + 1)

    o_t = tl.arange(0, BT)
    o_t64 = o_t.to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < DK
    m_v = o_v < DV
    m_ij = o_t[:, None] >= o_t[None, :]
    e_d = tl.where(m_ij, o_t[:, None] - o_t[None, :], 0).to(ACC)
    b_d = tl.where(m_ij, tl.exp(g_hi * e_d) * tl.exp(g_lo * e_d), 0)
    b_d3 = tl.broadcast_to(b_d[None, :, :], (BK, BT, BT))  # the same scan for every d
    e_q = (o_t + 1).to(ACC)
    b_dq = tl.exp(g_hi * e_q) * tl.exp(g_lo * e_q)

    p_q0 = Q + i_b * sqb + i_h * sqh + o_k[:, None] * sqd  # q and k loaded transposed: (BK, BT)
    p_k0 = K + i_b * skb + i_h * skh + o_k[:, None] * skd
    p_v0 = V + i_b * svb + i_h * svh + o_v[None, :] * svd
    p_o0 = O + i_b * sob + i_h * soh + o_v[None, :] * sod

    m_s = m_k[:, None] & m_v[None, :]
    b_p = tl.zeros([BK, BV], dtype=ACC)  # the rows P_d of this Dk block
    if USE_INITIAL_STATE:
        p_s0 = S0 + i_b * s0b + i_h * s0h + o_k[:, None] * s0k + o_v[None, :] * s0v
        b_p = tl.load(p_s0, mask=m_s, other=0).to(ACC)

    for i_c in range(0, (N + BT - 1) // BT):
        r_t = i_c * BT + o_t64
        m_t = r_t < N
        m_kt = m_k[:, None] & m_t[None, :]
        b_qt = tl.load(p_q0 + r_t[None, :] * sqn, mask=m_kt, other=0).to(ACC)
        b_kt = tl.load(p_k0 + r_t[None, :] * skn, mask=m_kt, other=0).to(ACC)
        b_v = tl.load(p_v0 + r_t[:, None] * svn, mask=m_t[:, None] & m_v[None, :], other=0).to(ACC)
        n_c = tl.minimum(N - i_c * BT, BT)
        b_x = b_kt[:, :, None] * b_v[None, :, :]  # (BK, BT, BV): the rank-one terms k_t[d] v_t
        b_y = tl.dot(b_d3, b_x, input_precision=PREC) + b_dq[None, :, None] * b_p[:, None, :]  # P_d(t)
        b_o = tl.reduce(b_qt[:, :, None] * b_y, 0, SUM) * scale  # (BT, BV)
        m_o = m_t[:, None] & m_v[None, :]
        if ATOMIC:
            tl.atomic_add(p_o0 + r_t[:, None] * son, b_o, mask=m_o)
        else:
            if ROUND_BF16:
                b_o = round_to_bf16(b_o)
            tl.store(p_o0 + r_t[:, None] * son, b_o.to(O.dtype.element_ty), mask=m_o)
        e_k = tl.maximum(n_c - 1 - o_t, 0).to(ACC)
        b_kd = tl.exp(g_hi * e_k) * tl.exp(g_lo * e_k)
        e_c = n_c.to(ACC)
        f_hi = tl.where(n_c == BT, c_hi, tl.exp(g_hi * e_c) * tl.exp(g_lo * e_c))
        f_lo = tl.where(n_c == BT, c_lo, 0)
        b_p = b_p * f_hi + b_p * f_lo + tl.reduce(b_x * b_kd[None, :, None], 1, SUM)

    if STORE_FINAL_STATE:
        p_sn = SN + i_bh.to(tl.int64) * DK * DV + o_k[:, None] * DV + o_v[None, :]
        tl.store(p_sn, b_p.to(SN.dtype.element_ty), mask=m_s)


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
    acc = torch_acc_dtype(q.dtype)
    bt, bk, bv = _tiles(Dk, Dv)
    nk = triton.cdiv(Dk, bk)
    o = empty_output((B, H, N, Dv), q.dtype, q.device)
    out = o if nk == 1 else torch.zeros((B, H, N, Dv), dtype=acc, device=q.device)
    final = torch.empty((B, H, Dk, Dv) if output_final_state else (0,), dtype=acc, device=q.device)
    fp64 = q.dtype == torch.float64  # a Python float reaches the kernel as fp32: apply an fp64 scale afterwards
    launcher(fleet_fwd_kernel)[(B * H, nk, triton.cdiv(Dv, bv))](
        q, k, v, out, initial_state if initial_state is not None else o, final,
        split_log_decay(log_decay), decay_power(log_decay, bt),
        1.0 if fp64 else scale, N, H, Dk, Dv,
        *strides(q), *strides(k), *strides(v), *strides(out), *strides(initial_state),
        BT=bt, BK=bk, BV=bv,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state, ATOMIC=nk > 1,
        ACC=acc_dtype(q.dtype), PREC="ieee" if fp64 else "tf32x3", ROUND_BF16=round_bf16(q.dtype),
        num_warps=warps(bk * bt * bv // 4), num_stages=2,
    )  # fmt: skip
    if fp64 and scale != 1.0:
        out.mul_(scale)
    if out is not o:
        o.copy_(out)
    return o, final
