"""triton_chunked: the chunked (Lightning Attention-2) algorithm as fused single-pass Triton kernels.

Forward: one program per (Dv block, batch * head) walks the sequence chunk by chunk (BT tokens) with the state
block S (Dk x BV, fp32) kept on chip:

    o_i   = scale * ( sum_{j <= i} lambda^(i-j) (q_i . k_j) v_j  +  lambda^(i+1) q_i S )      i, j in the chunk
    S    <- lambda^L S + sum_j lambda^(L-1-j) k_j^T v_j                                         L = chunk length

Backward (three kernels, the same walk): with the state-gradient dH (the gradient of the loss with respect to
the state entering a chunk; dH = dS_N after the last chunk) carried backwards,

    dq_i = scale * ( sum_{j <= i} lambda^(i-j) (do_i . v_j) k_j  +  lambda^(i+1) do_i S^T )   (forward walk)
    dk_j = scale * sum_{i >= j} lambda^(i-j) (do_i . v_j) q_i  +  lambda^(L-1-j) v_j dH^T    (backward walk)
    dv_j = scale * sum_{i >= j} lambda^(i-j) (q_i . k_j) do_i  +  lambda^(L-1-j) k_j dH
    dH  <- lambda^L dH + scale * sum_i lambda^(i+1) q_i^T do_i,          dS_0 = dH at the start

d log lambda as in leetdecoding.methods.chunked: a sum of pair terms each weighted by its distance t - s >= 0,
never sum_t (t+1) (q_t . dq_t - k_t . dk_t) + N <S_N, dS_N> (O(1) terms cancelling to an O(lambda) result). For
a query t in a chunk starting at p and a key s in an earlier chunk ending at e, t - s = (t-p+1) + (e-1-s) + (p-e):

    dq kernel:  sum_t q_t . ( scale sum_{s <= t in the chunk} (t-s) lambda^(t-s) (do_t . v_s) k_s
                              + (t-p+1) [the inter-chunk part of dq_t] )
    dk kernel:  sum_s k_s . ( (e-1-s) [the inter-chunk part of dk_s]  +  lambda^(e-1-s) v_s dH'^T )
                + <S_0, dH' at the start>,      dH' <- lambda^L (dH' + L dH)  (dH' = 0 after the last chunk)

dH' weights each later query by its gap p - e; the final state is a query starting a chunk at p = T (each
sequence's own length T), so it needs no term of its own.

Nothing of size N Dk Dv (not even per-chunk states) is stored: memory is the inputs, outputs and their grads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    INTERPRET,
    SUM,
    acc_dtype,
    chunk_variants,
    decay_power,
    dim_block,
    dot_flags,
    empty_output,
    launch,
    launcher,
    mixed_dot,
    round_bf16,
    round_to_bf16,
    split_log_decay,
    strides,
    torch_acc_dtype,
    warps,
)

# strides of the batch and head axes depend on N for some layouts: never specialise on them (nor on N)
_NO_SPEC = ["N", "sqb", "sqh", "skb", "skh", "svb", "svh", "sob", "soh"]


@triton.jit
def _head_decays(LOG_DECAY, DECAY, H, BT: tl.constexpr, ACC: tl.constexpr):
    """This program's batch * head index (first grid axis), batch and head (64-bit), and its decays: log lambda
    as g_hi + g_lo (`split_log_decay`), lambda^BT = c_hi + c_lo (accurate: it compounds over chunks),
    b_d[i, j] = lambda^(i-j) for j <= i else 0, b_dq[i] = lambda^(i+1). Exp of non-positive numbers only,
    lambda^e always as exp(g_hi e) * exp(g_lo e) (written out: a nested jit call costs in the interpreter)."""
    i_bh = tl.program_id(0)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    g_hi = tl.load(LOG_DECAY + 2 * i_h).to(ACC)
    g_lo = tl.load(LOG_DECAY + 2 * i_h + 1).to(ACC)
    c_hi = tl.load(DECAY + 2 * i_h)
    c_lo = tl.load(DECAY + 2 * i_h + 1)
    o_t = tl.arange(0, BT)
    m_ij = o_t[:, None] >= o_t[None, :]
    e_d = tl.where(m_ij, o_t[:, None] - o_t[None, :], 0).to(ACC)
    b_d = tl.where(m_ij, tl.exp(g_hi * e_d) * tl.exp(g_lo * e_d), 0)
    e_q = (o_t + 1).to(ACC)
    b_dq = tl.exp(g_hi * e_q) * tl.exp(g_lo * e_q)
    return i_bh.to(tl.int64), i_b, i_h, g_hi, g_lo, c_hi, c_lo, b_d, b_dq


@triton.jit
def _distances(BT: tl.constexpr, ACC: tl.constexpr):
    """(BT, BT): t - s for s <= t, else 0 (the weights of d log lambda's intra-chunk pairs)."""
    o_t = tl.arange(0, BT)
    return tl.where(o_t[:, None] >= o_t[None, :], o_t[:, None] - o_t[None, :], 0).to(ACC)


@triton.jit
def _chunk_end_decays(g_hi, g_lo, c_hi, c_lo, n_c, BT: tl.constexpr, ACC: tl.constexpr):
    """For a chunk of n_c tokens: lambda^(n_c-1-j) per row j (rows past n_c hold zeros anyway) and lambda^n_c as
    f_hi + f_lo (the host's accurate pair for a full chunk)."""
    o_t = tl.arange(0, BT)
    e_k = tl.maximum(n_c - 1 - o_t, 0).to(ACC)
    b_kd = tl.exp(g_hi * e_k) * tl.exp(g_lo * e_k)
    e_c = n_c.to(ACC)
    f_hi = tl.where(n_c == BT, c_hi, tl.exp(g_hi * e_c) * tl.exp(g_lo * e_c))
    f_lo = tl.where(n_c == BT, c_lo, 0)
    return b_kd, f_hi, f_lo


@triton.jit
def _sequence(CU, i_b, N, VARLEN: tl.constexpr):
    """(batch row, first token, length, sequence index) of this program's sequence: batch row i_b of N tokens,
    or with VARLEN the packed sequence i_b, tokens [CU[i_b], CU[i_b + 1]) of batch row 0."""
    if VARLEN:
        bos = tl.load(CU + i_b).to(tl.int64)
        n = (tl.load(CU + i_b + 1) - bos).to(tl.int32)
        row = i_b * 0
    else:
        bos = i_b * 0
        n = N
        row = i_b
    return row, bos, n, i_b


@triton.jit(do_not_specialize=_NO_SPEC)
def chunked_fwd_kernel(
    Q, K, V, O, S0, SN, LOG_DECAY, DECAY, CU,
    scale, N, H, DK, DV,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    s0b, s0h, s0k, s0v,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, NATIVE_QK: tl.constexpr, MODE: tl.constexpr,
    ROUND_BF16: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    i_bh, i_b, i_h, g_hi, g_lo, c_hi, c_lo, b_d, b_dq = _head_decays(LOG_DECAY, DECAY, H, BT, ACC)
    i_b, bos, T, i_n = _sequence(CU, i_b, N, VARLEN)  # T tokens from bos; i_n indexes states
    i_v = tl.program_id(1)

    o_t = tl.arange(0, BT)
    o_t64 = o_t.to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < DK
    m_v = o_v < DV

    p_q0 = Q + i_b * sqb + i_h * sqh + bos * sqn + o_k[None, :] * sqd  # (1, BK); rows added per chunk
    p_k0 = K + i_b * skb + i_h * skh + bos * skn + o_k[:, None] * skd  # (BK, 1): k loaded transposed
    p_v0 = V + i_b * svb + i_h * svh + bos * svn + o_v[None, :] * svd
    p_o0 = O + i_b * sob + i_h * soh + bos * son + o_v[None, :] * sod

    m_s = m_k[:, None] & m_v[None, :]
    b_s = tl.zeros([BK, BV], dtype=ACC)
    if USE_INITIAL_STATE:
        p_s0 = S0 + i_n * s0b + i_h * s0h + o_k[:, None] * s0k + o_v[None, :] * s0v
        b_s = tl.load(p_s0, mask=m_s, other=0).to(ACC)

    for i_c in range(0, (T + BT - 1) // BT):
        r_t = i_c * BT + o_t64  # the chunk's token indices (64-bit)
        m_t = r_t < T
        b_q = tl.load(p_q0 + r_t[:, None] * sqn, mask=m_t[:, None] & m_k[None, :], other=0)
        b_k = tl.load(p_k0 + r_t[None, :] * skn, mask=m_k[:, None] & m_t[None, :], other=0)  # (BK, BT)
        b_v = tl.load(p_v0 + r_t[:, None] * svn, mask=m_t[:, None] & m_v[None, :], other=0)
        n_c = tl.minimum(T - i_c * BT, BT)  # tokens in this chunk
        b_kd, f_hi, f_lo = _chunk_end_decays(g_hi, g_lo, c_hi, c_lo, n_c, BT, ACC)
        if NATIVE_QK:
            b_a = tl.dot(b_q, b_k)
        else:
            b_a = tl.dot(b_q.to(ACC), b_k.to(ACC), input_precision=PREC)
        b_a = b_a * b_d
        # decays applied to the smaller side of each product: q S scaled by row, k^T v through v's rows
        b_vd = b_v.to(ACC) * b_kd[:, None]
        b_o = mixed_dot(b_a, b_v, True, MODE, PREC) + mixed_dot(b_s, b_q, False, MODE, PREC) * b_dq[:, None]
        b_upd = mixed_dot(b_vd, b_k, False, MODE, PREC)
        b_o = b_o * scale
        if ROUND_BF16:
            b_o = round_to_bf16(b_o)
        tl.store(p_o0 + r_t[:, None] * son, b_o.to(O.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
        b_s = b_s * f_hi + b_s * f_lo + b_upd

    if STORE_FINAL_STATE:
        p_sn = SN + i_bh.to(tl.int64) * DK * DV + o_k[:, None] * DV + o_v[None, :]
        tl.store(p_sn, b_s.to(SN.dtype.element_ty), mask=m_s)


_NO_SPEC_BWD = [*_NO_SPEC, "sdb", "sdh"]


@triton.jit(do_not_specialize=_NO_SPEC_BWD)
def chunked_bwd_dq_kernel(
    Q, K, V, DO, DQ, S0, DGQ, LOG_DECAY, DECAY, CU,
    scale, N, H, DK, DV,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdn, sdd,
    s0b, s0h, s0k, s0v,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, NATIVE_QK: tl.constexpr, MODE: tl.constexpr,
    ROUND_BF16: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """dq for one Dk block (all of Dv), walking forwards with S^T (Dv x BK); also this block's share of
    d log lambda's query-side terms (the module docstring)."""
    i_bh, i_b, i_h, g_hi, g_lo, c_hi, c_lo, b_d, b_dq = _head_decays(LOG_DECAY, DECAY, H, BT, ACC)
    i_b, bos, T, i_n = _sequence(CU, i_b, N, VARLEN)  # T tokens from bos; i_n indexes states
    i_k = tl.program_id(1)

    o_t = tl.arange(0, BT)
    o_t64 = o_t.to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < DK
    m_v = o_v < DV

    p_q0 = Q + i_b * sqb + i_h * sqh + bos * sqn + o_k[None, :] * sqd
    p_k0 = K + i_b * skb + i_h * skh + bos * skn + o_k[None, :] * skd
    p_v0 = V + i_b * svb + i_h * svh + bos * svn + o_v[:, None] * svd  # v loaded transposed (BV, BT)
    p_do0 = DO + i_b * sdb + i_h * sdh + bos * sdn + o_v[None, :] * sdd
    p_dq0 = DQ + ((i_b * H + i_h) * N + bos) * DK + o_k[None, :]  # dq is contiguous (B, H, N, Dk)

    b_st = tl.zeros([BV, BK], dtype=ACC)  # S^T for this Dk block
    if USE_INITIAL_STATE:
        p_s0 = S0 + i_n * s0b + i_h * s0h + o_v[:, None] * s0v + o_k[None, :] * s0k
        b_st = tl.load(p_s0, mask=m_v[:, None] & m_k[None, :], other=0).to(ACC)
    b_dg = tl.zeros([BT], dtype=ACC)
    b_w = _distances(BT, ACC)
    e_p = (o_t + 1).to(ACC)  # t - p + 1

    for i_c in range(0, (T + BT - 1) // BT):
        r_t = i_c * BT + o_t64
        m_t = r_t < T
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(p_q0 + r_t[:, None] * sqn, mask=m_tk, other=0)
        b_k = tl.load(p_k0 + r_t[:, None] * skn, mask=m_tk, other=0)
        b_vt = tl.load(p_v0 + r_t[None, :] * svn, mask=m_v[:, None] & m_t[None, :], other=0)
        b_do = tl.load(p_do0 + r_t[:, None] * sdn, mask=m_t[:, None] & m_v[None, :], other=0)
        n_c = tl.minimum(T - i_c * BT, BT)
        b_kd, f_hi, f_lo = _chunk_end_decays(g_hi, g_lo, c_hi, c_lo, n_c, BT, ACC)
        if NATIVE_QK:
            b_da = tl.dot(b_do, b_vt)
        else:
            b_da = tl.dot(b_do.to(ACC), b_vt.to(ACC), input_precision=PREC)
        b_da = b_da * b_d
        b_kd2 = b_k.to(ACC) * b_kd[:, None]
        b_inter = mixed_dot(b_st, b_do, False, MODE, PREC) * b_dq[:, None]
        b_dqv = (mixed_dot(b_da, b_k, True, MODE, PREC) + b_inter) * scale
        b_upd = mixed_dot(b_kd2, b_vt, False, MODE, PREC)
        b_out = b_dqv
        if ROUND_BF16:
            b_out = round_to_bf16(b_out)
        tl.store(p_dq0 + r_t[:, None] * DK, b_out.to(DQ.dtype.element_ty), mask=m_tk)
        # d log lambda: intra-chunk pairs weighted by t - s, the inter-chunk part by t - p + 1 (no cancellation)
        b_dqw = mixed_dot(b_da * b_w, b_k, True, MODE, PREC) + b_inter * e_p[:, None]
        b_dg += tl.reduce(b_q.to(ACC) * b_dqw, 1, SUM)
        b_st = b_st * f_hi + b_st * f_lo + b_upd

    tl.store(DGQ + i_bh.to(tl.int64) * tl.num_programs(1) + i_k, tl.reduce(b_dg, 0, SUM) * scale)


@triton.jit(do_not_specialize=_NO_SPEC_BWD)
def chunked_bwd_dk_kernel(
    Q, K, V, DO, DK_OUT, DSN, S0, DS0, DGK, LOG_DECAY, DECAY, CU,
    scale, N, H, DK, DV,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdn, sdd,
    snb, snh, snk, snv,
    s0b, s0h, s0k, s0v,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_FINAL_GRAD: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, NATIVE_QK: tl.constexpr, MODE: tl.constexpr,
    ROUND_BF16: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """dk for one Dk block (all of Dv), walking backwards with dH^T (Dv x BK) and its gap-weighted twin dH'^T;
    also dS_0 (with an initial state) and this block's share of d log lambda's key-side terms (the module
    docstring)."""
    i_bh, i_b, i_h, g_hi, g_lo, c_hi, c_lo, b_d, b_dq = _head_decays(LOG_DECAY, DECAY, H, BT, ACC)
    i_b, bos, T, i_n = _sequence(CU, i_b, N, VARLEN)  # T tokens from bos; i_n indexes states
    i_k = tl.program_id(1)

    o_t = tl.arange(0, BT)
    o_t64 = o_t.to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < DK
    m_v = o_v < DV
    b_dt = tl.trans(b_d)  # b_dt[j, i] = lambda^(i-j) for i >= j

    p_q0 = Q + i_b * sqb + i_h * sqh + bos * sqn + o_k[None, :] * sqd
    p_k0 = K + i_b * skb + i_h * skh + bos * skn + o_k[None, :] * skd
    p_v0 = V + i_b * svb + i_h * svh + bos * svn + o_v[None, :] * svd
    p_do0 = DO + i_b * sdb + i_h * sdh + bos * sdn + o_v[:, None] * sdd  # do loaded transposed (BV, BT)
    p_dk0 = DK_OUT + ((i_b * H + i_h) * N + bos) * DK + o_k[None, :]

    m_vk = m_v[:, None] & m_k[None, :]
    b_dht = tl.zeros([BV, BK], dtype=ACC)  # dH^T for this Dk block
    if USE_FINAL_GRAD:
        p_dsn = DSN + i_n * snb + i_h * snh + o_v[:, None] * snv + o_k[None, :] * snk
        b_dht = tl.load(p_dsn, mask=m_vk, other=0).to(ACC)
    b_gpt = tl.zeros([BV, BK], dtype=ACC)  # dH'^T: 0 after the last chunk (the final state's gap is 0)
    b_dg = tl.zeros([BT], dtype=ACC)

    n_chunks = (T + BT - 1) // BT
    for i_r in range(0, n_chunks):
        i_c = n_chunks - 1 - i_r
        r_t = i_c * BT + o_t64
        m_t = r_t < T
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(p_q0 + r_t[:, None] * sqn, mask=m_tk, other=0)
        b_k = tl.load(p_k0 + r_t[:, None] * skn, mask=m_tk, other=0)
        b_v = tl.load(p_v0 + r_t[:, None] * svn, mask=m_t[:, None] & m_v[None, :], other=0)
        b_dot = tl.load(p_do0 + r_t[None, :] * sdn, mask=m_v[:, None] & m_t[None, :], other=0)
        n_c = tl.minimum(T - i_c * BT, BT)
        b_kd, f_hi, f_lo = _chunk_end_decays(g_hi, g_lo, c_hi, c_lo, n_c, BT, ACC)
        if NATIVE_QK:
            b_dat = tl.dot(b_v, b_dot)
        else:
            b_dat = tl.dot(b_v.to(ACC), b_dot.to(ACC), input_precision=PREC)
        b_dat = b_dat * b_dt
        b_qd = b_q.to(ACC) * b_dq[:, None]
        b_inter = mixed_dot(b_dht, b_v, False, MODE, PREC) * b_kd[:, None]
        b_dkv = mixed_dot(b_dat, b_q, True, MODE, PREC) * scale + b_inter
        b_upd = mixed_dot(b_qd, b_dot, False, MODE, PREC)
        b_out = b_dkv
        if ROUND_BF16:
            b_out = round_to_bf16(b_out)
        tl.store(p_dk0 + r_t[:, None] * DK, b_out.to(DK_OUT.dtype.element_ty), mask=m_tk)
        # d log lambda: the inter-chunk part of dk weighted by e - 1 - s, the gaps p - e through dH'
        e_e = tl.maximum(n_c - 1 - o_t, 0).to(ACC)
        b_dkw = b_inter * e_e[:, None] + mixed_dot(b_gpt, b_v, False, MODE, PREC) * b_kd[:, None]
        b_dg += tl.reduce(b_k.to(ACC) * b_dkw, 1, SUM)
        b_gpt += n_c.to(ACC) * b_dht
        b_gpt = b_gpt * f_hi + b_gpt * f_lo
        b_dht = b_dht * f_hi + b_dht * f_lo + b_upd * scale

    b_dg_sum = tl.reduce(b_dg, 0, SUM)
    if USE_INITIAL_STATE:  # a chunk ending at 0: only its gap to each query counts
        p_ds0 = DS0 + i_bh.to(tl.int64) * DK * DV + o_v[:, None] + o_k[None, :] * DV
        tl.store(p_ds0, b_dht.to(DS0.dtype.element_ty), mask=m_vk)
        p_s0 = S0 + i_n * s0b + i_h * s0h + o_v[:, None] * s0v + o_k[None, :] * s0k
        b_s0t = tl.load(p_s0, mask=m_vk, other=0).to(ACC)
        b_dg_sum += tl.reduce(tl.reduce(b_s0t * b_gpt, 1, SUM), 0, SUM)
    tl.store(DGK + i_bh.to(tl.int64) * tl.num_programs(1) + i_k, b_dg_sum)


@triton.jit(do_not_specialize=_NO_SPEC_BWD)
def chunked_bwd_dv_kernel(
    Q, K, DO, DV_OUT, DSN, LOG_DECAY, DECAY, CU,
    scale, N, H, DK, DV,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    sdb, sdh, sdn, sdd,
    snb, snh, snk, snv,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_FINAL_GRAD: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, NATIVE_QK: tl.constexpr, MODE: tl.constexpr,
    ROUND_BF16: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """dv for one Dv block (all of Dk), walking backwards with dH (Dk x BV)."""
    i_bh, i_b, i_h, g_hi, g_lo, c_hi, c_lo, b_d, b_dq = _head_decays(LOG_DECAY, DECAY, H, BT, ACC)
    i_b, bos, T, i_n = _sequence(CU, i_b, N, VARLEN)  # T tokens from bos; i_n indexes states
    i_v = tl.program_id(1)

    o_t = tl.arange(0, BT)
    o_t64 = o_t.to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < DK
    m_v = o_v < DV
    b_dt = tl.trans(b_d)  # b_dt[j, i] = lambda^(i-j) for i >= j

    p_q0 = Q + i_b * sqb + i_h * sqh + bos * sqn + o_k[:, None] * sqd  # q loaded transposed (BK, BT)
    p_k0 = K + i_b * skb + i_h * skh + bos * skn + o_k[None, :] * skd
    p_do0 = DO + i_b * sdb + i_h * sdh + bos * sdn + o_v[None, :] * sdd
    p_dv0 = DV_OUT + ((i_b * H + i_h) * N + bos) * DV + o_v[None, :]

    b_dh = tl.zeros([BK, BV], dtype=ACC)
    if USE_FINAL_GRAD:
        p_dsn = DSN + i_n * snb + i_h * snh + o_k[:, None] * snk + o_v[None, :] * snv
        b_dh = tl.load(p_dsn, mask=m_k[:, None] & m_v[None, :], other=0).to(ACC)

    n_chunks = (T + BT - 1) // BT
    for i_r in range(0, n_chunks):
        i_c = n_chunks - 1 - i_r
        r_t = i_c * BT + o_t64
        m_t = r_t < T
        m_tv = m_t[:, None] & m_v[None, :]
        b_qt = tl.load(p_q0 + r_t[None, :] * sqn, mask=m_k[:, None] & m_t[None, :], other=0)
        b_k = tl.load(p_k0 + r_t[:, None] * skn, mask=m_t[:, None] & m_k[None, :], other=0)
        b_do = tl.load(p_do0 + r_t[:, None] * sdn, mask=m_tv, other=0)
        n_c = tl.minimum(T - i_c * BT, BT)
        b_kd, f_hi, f_lo = _chunk_end_decays(g_hi, g_lo, c_hi, c_lo, n_c, BT, ACC)
        if NATIVE_QK:
            b_at = tl.dot(b_k, b_qt)
        else:
            b_at = tl.dot(b_k.to(ACC), b_qt.to(ACC), input_precision=PREC)
        b_at = b_at * b_dt
        b_dod = b_do.to(ACC) * b_dq[:, None]
        b_dvv = mixed_dot(b_at, b_do, True, MODE, PREC) * scale
        b_dvv += mixed_dot(b_dh, b_k, False, MODE, PREC) * b_kd[:, None]
        b_upd = mixed_dot(b_dod, b_qt, False, MODE, PREC)
        if ROUND_BF16:
            b_dvv = round_to_bf16(b_dvv)
        tl.store(p_dv0 + r_t[:, None] * DV, b_dvv.to(DV_OUT.dtype.element_ty), mask=m_tv)
        b_dh = b_dh * f_hi + b_dh * f_lo + b_upd * scale


# ----- host side -----


def _check_packed(q: torch.Tensor, cu_seqlens: torch.Tensor | None, **states: torch.Tensor | None) -> int:
    """Rows of the per-sequence states: B, or with `cu_seqlens` the number of packed sequences S. These are the
    operators' own checks (leetdecoding.attention validates more before it gets here); no device sync."""
    if cu_seqlens is None:
        return q.shape[0]
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or cu_seqlens.device != q.device:
        raise ValueError(
            f"cu_seqlens must be 1-D with S + 1 >= 2 offsets on {q.device}; got shape {tuple(cu_seqlens.shape)} "
            f"on {cu_seqlens.device}."
        )
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, q, k, v must be packed as batch 1; got batch {q.shape[0]}.")
    rows = cu_seqlens.numel() - 1
    for name, state in states.items():
        if state is not None and state.shape[0] != rows:
            raise ValueError(f"{name} must have one row per sequence ({rows}); got shape {tuple(state.shape)}.")
    return rows


def _fwd_tiles(dk: int, dv: int) -> tuple[int, int]:
    bk = dim_block(dk)
    bv = dim_block(dv)
    if not INTERPRET:  # one program per Dv block: keep the state block S (BK x BV) in registers
        bv = min(bv, 64 if bk <= 128 else 32)
    return bk, bv


def _bwd_tiles(d_split: int, d_full: int) -> tuple[int, int, int]:
    """(BT, block of the split dim, block of the full dim) for the backward kernels."""
    full = dim_block(d_full)
    split = dim_block(d_split)
    if INTERPRET:
        return 64, split, full
    split = min(split, 64 if full <= 128 else 32)
    bt = 64 if full <= 128 else 32
    return bt, split, full


def _stages(dtype: torch.dtype) -> int:
    return 2 if dtype == torch.float32 else 3


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
    acc = torch_acc_dtype(q.dtype)
    rows = _check_packed(q, cu_seqlens, initial_state=initial_state)  # programs per head: batch rows or sequences
    o = empty_output((B, H, N, Dv), q.dtype, q.device)
    final = torch.empty((rows, H, Dk, Dv) if output_final_state else (0,), dtype=acc, device=q.device)
    fp64 = q.dtype == torch.float64  # a Python float reaches the kernel as fp32: apply an fp64 scale afterwards
    prec, native, mode = dot_flags(q.dtype, precision)
    bk, bv = _fwd_tiles(Dk, Dv)
    g_split = split_log_decay(log_decay)

    def run(variant):
        bt, stages = variant
        launcher(chunked_fwd_kernel)[(rows * H, triton.cdiv(Dv, bv))](
            q, k, v, o, initial_state if initial_state is not None else o, final, g_split,
            decay_power(log_decay, bt), cu_seqlens if cu_seqlens is not None else log_decay,
            1.0 if fp64 else scale, N, H, Dk, Dv,
            *strides(q), *strides(k), *strides(v), *strides(o), *strides(initial_state),
            BT=bt, BK=bk, BV=bv,
            USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
            ACC=acc_dtype(q.dtype), PREC=prec, NATIVE_QK=native, MODE=mode, ROUND_BF16=round_bf16(q.dtype),
            VARLEN=cu_seqlens is not None, num_warps=warps(bk * bv), num_stages=stages,
        )  # fmt: skip

    packed = cu_seqlens is not None
    key = ("fwd", Dk, Dv, q.dtype, chunk_size, precision, initial_state is not None, output_final_state, packed)
    # head dims over 128: chunks of 32 at most on the GPU, as in the backward (smaller register tiles, fewer spills)
    bt = chunk_size if INTERPRET or bk <= 128 else min(chunk_size, 32)
    launch(key, chunk_variants(bt, _stages(q.dtype)), run)
    if fp64 and scale != 1.0:
        o.mul_(scale)
    return o, final


def backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    initial_state: torch.Tensor | None,
    final_state: torch.Tensor | None,
    do: torch.Tensor,
    dfinal: torch.Tensor | None,
    scale: float,
    precision: str,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, dlog_decay, dinitial_state or None). `final_state` is not read (d log lambda no longer needs
    it); the parameter stays for the operator's schema (leetdecoding.methods.triton.ops)."""
    B, H, N, Dk = q.shape
    rows = _check_packed(q, cu_seqlens, initial_state=initial_state, final_state=final_state, dfinal=dfinal)
    Dv = v.shape[-1]
    acc = torch_acc_dtype(q.dtype)
    if q.dtype == torch.float64:  # an fp64 scale applied to do here rather than as an fp32 kernel argument
        do, scale = do * scale, 1.0
    g_split = split_log_decay(log_decay)
    prec, native, mode = dot_flags(q.dtype, precision)
    flags = dict(ACC=acc_dtype(q.dtype), PREC=prec, NATIVE_QK=native, MODE=mode, ROUND_BF16=round_bf16(q.dtype))
    flags["VARLEN"] = cu_seqlens is not None
    cu = cu_seqlens if cu_seqlens is not None else log_decay  # a pointer the kernels never read without VARLEN
    dq = torch.empty(B, H, N, Dk, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, H, N, Dk, dtype=k.dtype, device=q.device)
    dv = torch.empty(B, H, N, Dv, dtype=v.dtype, device=q.device)
    ds0 = torch.empty(rows, H, Dk, Dv, dtype=acc, device=q.device) if initial_state is not None else None
    dfinal_or_any = dfinal if dfinal is not None else q  # a pointer the kernel never reads without the flag
    key = (Dk, Dv, q.dtype, precision, initial_state is not None, dfinal is not None, cu_seqlens is not None)

    bt_k, bk, bvf = _bwd_tiles(Dk, Dv)
    nk = triton.cdiv(Dk, bk)
    dg_q = torch.empty(rows * H, nk, dtype=acc, device=q.device)
    dg_k = torch.empty(rows * H, nk, dtype=acc, device=q.device)
    common = (scale, N, H, Dk, Dv, *strides(q), *strides(k), *strides(v), *strides(do))

    def run_dq(variant):
        bt, stages = variant
        launcher(chunked_bwd_dq_kernel)[(rows * H, nk)](
            q, k, v, do, dq, initial_state if initial_state is not None else q, dg_q, g_split,
            decay_power(log_decay, bt), cu,
            *common, *strides(initial_state),
            BT=bt, BK=bk, BV=bvf, USE_INITIAL_STATE=initial_state is not None, **flags,
            num_warps=warps(bvf * bk), num_stages=stages,
        )  # fmt: skip

    def run_dk(variant):
        bt, stages = variant
        launcher(chunked_bwd_dk_kernel)[(rows * H, nk)](
            q, k, v, do, dk, dfinal_or_any, initial_state if initial_state is not None else q,
            ds0 if ds0 is not None else dg_k, dg_k, g_split, decay_power(log_decay, bt), cu,
            *common, *strides(dfinal), *strides(initial_state),
            BT=bt, BK=bk, BV=bvf, USE_FINAL_GRAD=dfinal is not None, USE_INITIAL_STATE=ds0 is not None, **flags,
            num_warps=warps(bvf * bk), num_stages=stages,
        )  # fmt: skip

    bt_v, bv, bkf = _bwd_tiles(Dv, Dk)

    def run_dv(variant):
        bt, stages = variant
        launcher(chunked_bwd_dv_kernel)[(rows * H, triton.cdiv(Dv, bv))](
            q, k, do, dv, dfinal_or_any, g_split, decay_power(log_decay, bt), cu,
            scale, N, H, Dk, Dv, *strides(q), *strides(k), *strides(do), *strides(dfinal),
            BT=bt, BK=bkf, BV=bv, USE_FINAL_GRAD=dfinal is not None, **flags,
            num_warps=warps(bkf * bv), num_stages=stages,
        )  # fmt: skip

    launch(("dq", *key), chunk_variants(bt_k, _stages(q.dtype)), run_dq)
    launch(("dk", *key), chunk_variants(bt_k, _stages(q.dtype)), run_dk)
    launch(("dv", *key), chunk_variants(bt_v, _stages(q.dtype)), run_dv)
    # dlog_lambda: the query- and key-side distance-weighted sums (nothing cancels; the final state's pairs are
    # in the key side), per Dk block and sequence, summed per head
    dg = (dg_q.double().sum(-1) + dg_k.double().sum(-1)).view(rows, H).sum(0)
    return dq, dk, dv, dg.to(log_decay.dtype), ds0
